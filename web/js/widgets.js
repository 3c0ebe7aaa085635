// Widgets on nodes: numbers that snap to their step and stay in range, combos whose choices
// refresh from the server, a resizable textarea for multiline text (a DOM element kept over the
// canvas), a seed's "control after generate", and LoadImage's upload button.

import { api } from "./api.js";

const MAX_SAFE = Number.MAX_SAFE_INTEGER;
export const SEED_INPUTS = new Set(["seed", "noise_seed"]);
export const SEED_CONTROLS = ["fixed", "increment", "decrement", "randomize"];
const UPLOAD_NODES = new Set(["LoadImage", "LoadImageMask"]);
const TEXTAREA_HEIGHT = 66;

function decimals(step) {
  const text = String(step);
  return text.includes(".") ? text.split(".")[1].length : 0;
}

function bounds(spec) {
  return [Math.max(spec.min ?? -MAX_SAFE, -MAX_SAFE), Math.min(spec.max ?? MAX_SAFE, MAX_SAFE)];
}

// A widget value as the workflow file wants it: integers for INT, no float noise from dragging.
// Out-of-range values read from a file are kept (validation names them); edits use snapValue.
export function normalizeValue(spec, value) {
  if ((spec.type !== "INT" && spec.type !== "FLOAT") || typeof value !== "number" || !Number.isFinite(value)) {
    return value;
  }
  return spec.type === "INT" ? Math.round(value) : Number(value.toPrecision(12));
}

// What an edit of a number widget leaves: on the step's grid (counted from the minimum), in range.
export function snapValue(spec, value) {
  if ((spec.type !== "INT" && spec.type !== "FLOAT") || typeof value !== "number" || !Number.isFinite(value)) {
    return value;
  }
  const [min, max] = bounds(spec);
  const step = spec.step ?? (spec.type === "INT" ? 1 : 0);
  if (step > 0) {
    const base = Number.isFinite(spec.min) ? spec.min : 0;
    value = base + Math.round((value - base) / step) * step;
    if (value > max) value -= step;
    if (value < min) value += step;
    if (spec.type === "FLOAT") value = Number(value.toFixed(Math.max(decimals(step), decimals(base))));
  }
  return normalizeValue(spec, Math.min(max, Math.max(min, value)));
}

export function makeWidget(node, spec, value, { onChoices } = {}) {
  const onChange = (v) => {
    const widget = node.ngWidgets[spec.name];
    // litegraph's number prompt yields NaN for text that is not a number: keep the old value.
    if (typeof v === "number" && !Number.isFinite(v)) v = widget.ngLast;
    widget.value = snapValue(spec, v);
    widget.ngLast = widget.value;
    node.ngTouch(spec.name);
    node.graph?.onNgChange?.(node, spec.name);
  };
  if (spec.multiline) return textareaWidget(node, spec, value, onChange);
  let type = "text";
  const options = {};
  if (spec.type === "INT" || spec.type === "FLOAT") {
    type = "number";
    const step = spec.step ?? (spec.type === "INT" ? 1 : 0.1);
    options.step = step * 10; // litegraph moves a number widget by step / 10 per click
    options.precision = spec.type === "INT" ? 0 : Math.max(2, decimals(step));
    [options.min, options.max] = bounds(spec);
  } else if (spec.type === "BOOLEAN") {
    type = "toggle";
  } else if (spec.type === "COMBO") {
    type = "combo";
    // Asked each time the list opens (with the widget; drawing asks without): the choices refresh
    // from the server then (model files added).
    options.values = (widget) => {
      if (widget) onChoices?.(node, widget);
      return spec.choices || [];
    };
  }
  return { type, name: spec.name, value, callback: onChange, options, ngSpec: spec, ngLast: value };
}

// The widgets that follow an input's widget: the seed's control, LoadImage's upload button.
export function companions(node, spec, { onUpload } = {}) {
  if (spec.type === "INT" && SEED_INPUTS.has(spec.name)) return [seedControl(node)];
  if (spec.type === "COMBO" && UPLOAD_NODES.has(node.ngSpec.type) && spec.name === "image") {
    return [{ type: "button", name: "upload", value: null, options: {}, callback: () => onUpload?.(node, spec) }];
  }
  return [];
}

function seedControl(node) {
  const widget = {
    type: "combo", name: "control_after_generate", options: { values: SEED_CONTROLS },
    callback: () => node.graph?.onNgChange?.(node, "control_after_generate"),
  };
  // Kept in the node's ui data, so it is saved with the workflow but is not an input.
  Object.defineProperty(widget, "value", {
    get: () => node.ngUi?.control_after_generate ?? "fixed",
    set: (v) => {
      node.ngUi = { ...(node.ngUi || {}), control_after_generate: v };
      if (v === "fixed") delete node.ngUi.control_after_generate;
    },
  });
  return widget;
}

// After a job is queued: each seed widget moves as its control says. Returns the nodes changed.
export function controlAfterGenerate(graph) {
  const changed = [];
  for (const node of graph._nodes) {
    const control = node.ngUi?.control_after_generate;
    if (!node.ngSpec || !control || control === "fixed") continue;
    for (const name of SEED_INPUTS) {
      const widget = node.ngWidgets?.[name];
      if (!widget || node.ngSockets.has(name) || typeof widget.value !== "number") continue;
      const [min, max] = bounds(widget.ngSpec);
      let value = widget.value;
      if (control === "increment") value = value + 1 > max ? min : value + 1;
      else if (control === "decrement") value = value - 1 < min ? max : value - 1;
      else value = min + Math.floor(Math.random() * (Math.min(max, 2 ** 50) - min + 1));
      widget.value = widget.ngLast = value;
      node.ngTouch(name);
      changed.push(node);
    }
  }
  if (changed.length) graph.setDirtyCanvas(true, true);
  return changed;
}

// The DOM elements of textarea widgets live in one layer over the canvas.
const layer = () => document.getElementById("widget-layer");
let frame = 0;
const shown = new Set();

function textareaWidget(node, spec, value, onChange) {
  let element = null; // made when the node is first drawn: copies and clones never get one
  const widget = {
    type: "ng_textarea", name: spec.name, value, options: { multiline: true }, ngSpec: spec, ngLast: value,
    ngHeight: TEXTAREA_HEIGHT, callback: onChange,
    computeSize: (width) => [width, widget.ngHeight],
    draw(ctx, drawn, width, y) {
      const canvas = drawn.graph?.list_of_graphcanvas?.[0];
      if (!canvas) return;
      if (!element?.isConnected) element = textareaElement(node, widget);
      const { scale, offset } = canvas.ds;
      const left = (drawn.pos[0] + 10 + offset[0]) * scale;
      const top = (drawn.pos[1] + y + offset[1]) * scale;
      Object.assign(element.style, {
        left: `${left}px`, top: `${top}px`, width: `${(width - 20) * scale}px`,
        height: `${widget.ngHeight * scale}px`, fontSize: `${12 * scale}px`,
      });
      element.ngScale = scale;
      if (document.activeElement !== element && element.value !== String(widget.value ?? "")) {
        element.value = String(widget.value ?? "");
      }
      element.hidden = false;
      element.ngFrame = frame;
      shown.add(element);
    },
  };
  return widget;
}

function textareaElement(node, widget) {
  const element = document.createElement("textarea");
  element.className = "node-text";
  element.dataset.input = widget.name;
  element.placeholder = widget.name;
  element.spellcheck = false;
  element.value = String(widget.value ?? "");
  layer().append(element);
  element.addEventListener("input", () => widget.callback(element.value));
  // While typing, the editor records no undo steps (the textarea has its own undo); leaving it
  // makes what was typed one step.
  element.addEventListener("blur", () => setTimeout(() => node.graph?.onNgChange?.(node, widget.name), 0));
  // Dragging the textarea's corner makes it (and its node) taller.
  new ResizeObserver(() => {
    if (element.hidden || !element.ngScale) return;
    const height = element.offsetHeight / element.ngScale;
    if (Math.abs(height - widget.ngHeight) < 2) return;
    widget.ngHeight = Math.max(30, height);
    node.refreshWidgets?.();
  }).observe(element);
  node.ngElements = [...(node.ngElements || []), element];
  return element;
}

// Called once per canvas frame, after the nodes: hide the textareas whose nodes were not drawn.
export function endFrame() {
  for (const element of shown) {
    if (element.ngFrame !== frame || !element.isConnected) {
      element.hidden = true;
      shown.delete(element);
    }
  }
  frame += 1;
}

export function removeElements(node) {
  for (const element of node.ngElements || []) {
    shown.delete(element);
    element.remove();
  }
  node.ngElements = [];
}

// LoadImage's upload: pick a file, send it to the input folder, select it on the node.
export async function uploadImage(node, spec, file) {
  const form = new FormData();
  form.append("image", file, file.name);
  const saved = await api.upload(form);
  const name = saved.subfolder ? `${saved.subfolder}/${saved.name}` : saved.name;
  if (!spec.choices.includes(name)) spec.choices = [...spec.choices, name].sort();
  const widget = node.ngWidgets[spec.name];
  widget.callback(name);
  widget.value = name;
  node.setDirtyCanvas(true, true);
  return name;
}
