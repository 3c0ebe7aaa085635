// litegraph node types generated from the server's catalog (GET /api/nodes): typed sockets,
// widgets for literal inputs (ranges, choices, multiline text), and ComfyUI's "convert a widget
// to an input" for inputs that accept either a literal or a link.
/* global LiteGraph, LGraphNode, LGraphCanvas */

import { drawImages, imageAreaHeight } from "./runview.js";
import { companions, makeWidget, normalizeValue, removeElements } from "./widgets.js";

export { normalizeValue };

const ANY = "*";
// litegraph's node.mode values for the editor's Mute and Bypass (4, as in ComfyUI).
export const MUTE = 2, BYPASS = 4;

// Mirrors nodegraph/schema.py link_compatible: same type, `*`, INT→FLOAT, STRING↔COMBO.
export function linkCompatible(source, target) {
  if (source === target || source === ANY || target === ANY) return true;
  return (source === "INT" && target === "FLOAT") || (source === "STRING" && target === "COMBO") ||
    (source === "COMBO" && target === "STRING");
}

export const TYPE_COLORS = {
  MODEL: "#b39ddb", IMAGE: "#64b5f6", INT: "#81c784", FLOAT: "#aed581", STRING: "#ffb74d",
  COMBO: "#ffd54f", BOOLEAN: "#e57373", SCHEDULE: "#4dd0e1", "*": "#bdbdbd",
};

// Where an input lives when a node is created: "widget" or "slot". `*` inputs are mostly fed by
// links, so they start as sockets even though they also take literals.
function startsAs(spec) {
  if (spec.accepts === "link") return "slot";
  if (spec.accepts === "literal") return "widget";
  return spec.type === ANY ? "slot" : "widget";
}

export function canConvert(spec) {
  return spec.accepts === "either";
}

export function defaultValue(spec) {
  if (spec.default !== undefined) return spec.default;
  switch (spec.type) {
    case "INT": return Math.max(0, spec.min ?? 0);
    case "FLOAT": return Math.max(0, spec.min ?? 0);
    case "BOOLEAN": return false;
    case "COMBO": return spec.choices?.[0] ?? "";
    default: return "";
  }
}

// What the editor does for widgets: refresh a combo's choices as it opens, upload an image.
export const widgetHooks = { onChoices: null, onUpload: null };

// Room for a widget's label and value side by side (litegraph does not measure them).
function widgetWidth(widget) {
  if (widget.type === "ng_textarea") return 260;
  const value = widget.type === "number" ? Number(widget.value).toFixed(widget.options.precision ?? 0) : String(widget.value);
  return Math.min(420, 80 + 6.5 * (widget.name.length + Math.min(value.length, 30)));
}

// litegraph draws a widget's value over its label when the value is long: draw it shortened
// with an ellipsis instead (the value itself is untouched; it is swapped only while drawing).
export function fitWidgetText() {
  const draw = LGraphCanvas.prototype.drawNodeWidgets;
  LGraphCanvas.prototype.drawNodeWidgets = function (node, posY, ctx, active) {
    const swapped = [];
    ctx.font = this.inner_text_font;
    for (const w of node.widgets || []) {
      if ((w.type !== "text" && w.type !== "combo") || typeof w.value !== "string") continue;
      const width = w.width || node.size[0];
      const label = ctx.measureText(w.label || w.name).width;
      const room = w.type === "combo" ? width - 95 - label : width - 70 - label;
      const text = w.value.replace(/\s+/g, " ");
      if (text === w.value && ctx.measureText(text).width <= room) continue;
      let shown = text;
      while (shown.length > 1 && ctx.measureText(shown + "…").width > room) shown = shown.slice(0, -1);
      swapped.push([w, w.value]);
      w.value = shown === text ? text : shown + "…";
    }
    try {
      return draw.call(this, node, posY, ctx, active);
    } finally {
      for (const [w, value] of swapped) w.value = value;
    }
  };
}

// The registered litegraph key of each nodegraph type ("category/Type", which gives the menus).
export const registeredKey = new Map();

export function registerCatalog(catalog) {
  LiteGraph.clearRegisteredTypes();
  registeredKey.clear();
  for (const spec of Object.values(catalog.nodes)) {
    const key = `${spec.category || "other"}/${spec.type}`;
    LiteGraph.registerNodeType(key, nodeClass(spec));
    registeredKey.set(spec.type, key);
  }
}

export function createNode(type) {
  const key = registeredKey.get(type);
  return key ? LiteGraph.createNode(key) : null;
}

function nodeClass(spec) {
  const inputSpecs = new Map(spec.inputs.map((i) => [i.name, i]));

  class NodegraphNode extends LGraphNode {
    constructor(title) {
      super(title);
      this.ngSpec = spec;
      this.ngWidgets = {}; // input name → widget (shown unless the input is a socket)
      this.ngSockets = new Set(); // "either" inputs currently shown as sockets
      this.ngRun = {}; // what the last run showed: status, progress, images, errors (run_state.js)
      for (const input of spec.inputs) {
        const value = defaultValue(input);
        if (input.accepts !== "link") this.ngWidgets[input.name] = makeWidget(this, input, value, widgetHooks);
        if (startsAs(input) === "slot") this.addSocket(input);
      }
      for (const output of spec.outputs) {
        this.addOutput(output.name, output.type, { color_on: TYPE_COLORS[output.type] });
      }
      this.refreshWidgets();
      this.size[0] = Math.max(this.size[0], ...this.widgets.map(widgetWidth));
      if (spec.output_node) this.color = "#3d4b5c";
    }

    onDrawBackground(ctx) {
      drawImages(this, ctx);
    }

    onRemoved() {
      removeElements(this);
    }

    // Once an input is linked or edited, what the opened file said about it no longer applies.
    ngTouch(name) {
      if (this.ngRaw) delete this.ngRaw[name];
      this.ngAbsent?.delete(name);
    }

    onConnectionsChange(kind, _index, connected, _link, slot) {
      if (kind === LiteGraph.INPUT && connected && slot) this.ngTouch(slot.name);
      this.graph?.onNgChange?.(this, slot?.name);
    }

    inputSpec(name) {
      return inputSpecs.get(name);
    }

    addSocket(input) {
      if (input.accepts !== "link") this.ngSockets.add(input.name);
      this.addInput(input.name, input.type, {
        color_on: TYPE_COLORS[input.type], label: input.required ? input.name : `${input.name}?`,
      });
    }

    // Widgets in the catalog's order, leaving out the inputs shown as sockets.
    refreshWidgets() {
      this.ngCompanions = this.ngCompanions || {};
      this.widgets = spec.inputs.filter((i) => this.ngWidgets[i.name] && !this.ngSockets.has(i.name))
        .flatMap((i) => {
          this.ngCompanions[i.name] = this.ngCompanions[i.name] || companions(this, i, widgetHooks);
          return [this.ngWidgets[i.name], ...this.ngCompanions[i.name]];
        });
      const size = this.computeSize();
      const wanted = Math.max(size[0], imageAreaHeight(this) ? 280 : 0);
      this.size = [Math.max(this.size?.[0] ?? 0, wanted), size[1] + imageAreaHeight(this)];
      this.setDirtyCanvas(true, true);
    }

    toSocket(name) {
      const input = inputSpecs.get(name);
      if (!canConvert(input) || this.ngSockets.has(name)) return;
      this.addSocket(input);
      this.refreshWidgets();
    }

    toWidget(name) {
      const slot = this.findInputSlot(name);
      if (!this.ngSockets.has(name) || slot < 0) return;
      this.ngSockets.delete(name);
      this.removeInput(slot); // drops its link too
      this.ngTouch(name);
      if (!this.ngWidgets[name]) this.ngWidgets[name] = makeWidget(this, inputSpecs.get(name), "", widgetHooks);
      this.refreshWidgets();
    }

    getMenuOptions() {
      const options = [];
      for (const input of spec.inputs) {
        if (!canConvert(input)) continue;
        const asSocket = this.ngSockets.has(input.name);
        options.push({
          content: asSocket ? `Convert ${input.name} to widget` : `Convert ${input.name} to input`,
          callback: () => (asSocket ? this.toWidget(input.name) : this.toSocket(input.name)),
        });
      }
      if (options.length) options.push(null);
      const setMode = (mode) => {
        this.mode = this.mode === mode ? LiteGraph.ALWAYS : mode;
        this.setDirtyCanvas(true, true);
        this.graph?.onNgChange?.(this, null);
      };
      options.push(
        { content: this.mode === BYPASS ? "Remove bypass" : "Bypass (Ctrl+B)", callback: () => setMode(BYPASS) },
        { content: this.mode === MUTE ? "Unmute" : "Mute (Ctrl+M)", callback: () => setMode(MUTE) },
        null,
        // Renames in the same prompt as a double-click (kept inside the window).
        { content: "Title", callback: () => LGraphCanvas.active_canvas?.showShowNodePanel(this) },
        { content: "Collapse", callback: LGraphCanvas.onMenuNodeCollapse },
        { content: "Pin", callback: LGraphCanvas.onMenuNodePin },
        { content: "Resize", callback: LGraphCanvas.onMenuResizeNode },
        null,
        { content: "Remove", callback: () => this.graph?.remove(this) },
      );
      return options;
    }

    // A wrong-type link is refused here too, so every path that connects (drag, API, paste) agrees.
    onConnectInput(targetSlot, outputType) {
      const input = this.inputs[targetSlot];
      return Boolean(input) && linkCompatible(String(outputType), String(input.type));
    }

    // Copy/paste and Clone go through serialize/configure: keep widget values and which inputs
    // are sockets (litegraph's own widgets_values is positional and our widget list changes).
    onSerialize(data) {
      data.ng = {
        values: Object.fromEntries(Object.entries(this.ngWidgets).map(([k, w]) => [k, w.value])),
        sockets: [...this.ngSockets],
      };
      delete data.widgets_values;
    }

    onConfigure(data) {
      if (!data.ng) return;
      this.ngSockets = new Set(data.ng.sockets);
      for (const [name, value] of Object.entries(data.ng.values)) {
        if (this.ngWidgets[name]) this.ngWidgets[name].value = value;
      }
      this.refreshWidgets();
    }
  }

  NodegraphNode.title = spec.type;
  NodegraphNode.desc = spec.description;
  return NodegraphNode;
}
