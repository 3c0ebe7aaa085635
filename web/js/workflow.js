// The editor graph ↔ the workflow file (nodegraph/1). Opening then saving gives back the same
// nodes and inputs: inputs the file left out stay out while they hold their default, a link keeps
// the form of its output reference (name or index), and anything the editor cannot show (an
// unknown node type, a link of the wrong type, an unknown input) is kept as written, so
// validation can report it on the right node.
/* global LGraphNode, LGraphGroup */

import { BYPASS, createNode, MUTE, normalizeValue } from "./nodetypes.js";

const NODE_KEYS = new Set(["type", "inputs", "title", "ui", "mode"]);
// Node modes as the workflow file writes them ↔ litegraph's node.mode.
const MODE_NAMES = { bypass: BYPASS, mute: MUTE };

export function isLink(value) {
  return Array.isArray(value) && value.length === 2;
}

// A node for a type this server does not know: drawn as a warning, saved back unchanged.
export class MissingNode extends LGraphNode {
  constructor(title) {
    super(title);
    this.color = "#6b2b2b";
    this.bgcolor = "#3b1f1f";
    this.size = [220, 60];
  }

  onDrawForeground(ctx) {
    ctx.fillStyle = "#f88";
    ctx.font = "12px sans-serif";
    ctx.fillText(`unknown node type ${this.ngRaw?.type}`, 10, 20);
  }
}
MissingNode.title = "missing";

function graphId(id) {
  // litegraph keeps numeric ids as numbers (its own counter continues after them).
  return /^(0|[1-9]\d{0,14})$/.test(id) ? Number(id) : id;
}

function outputSlot(origin, ref) {
  if (typeof ref === "number") return Number.isInteger(ref) && ref >= 0 && ref < (origin.outputs?.length ?? 0) ? ref : -1;
  return typeof ref === "string" ? origin.findOutputSlot(ref) : -1;
}

// Replace the graph's contents with a workflow. Returns the names of unknown node types.
export function loadWorkflow(graph, workflow) {
  graph.clear();
  const missing = new Set();
  const made = [];
  for (const [id, data] of Object.entries(workflow.nodes || {})) {
    let node = createNode(data.type);
    if (!node) {
      missing.add(String(data.type));
      node = new MissingNode(String(data.type));
      node.ngRaw = data;
    }
    node.id = graphId(id);
    node.ngTitle = data.title;
    if (data.title !== undefined) node.title = String(data.title);
    node.ngUi = { ...(data.ui || {}) };
    if (data.mode in MODE_NAMES) node.mode = MODE_NAMES[data.mode];
    node.ngExtra = Object.fromEntries(Object.entries(data).filter(([k]) => !NODE_KEYS.has(k)));
    graph.add(node, true);
    made.push([node, data]);
    if (Array.isArray(data.ui?.pos)) node.pos = [Number(data.ui.pos[0]) || 0, Number(data.ui.pos[1]) || 0];
    if (node.ngSpec) setInputs(node, data.inputs || {});
  }
  for (const [node, data] of made) {
    for (const [name, value] of Object.entries(data.inputs || {})) {
      if (isLink(value)) connect(graph, node, name, value);
    }
  }
  for (const node of graph._nodes) {
    const size = node.ngUi?.size;
    if (node.ngSpec) node.refreshWidgets();
    if (Array.isArray(size)) node.size = [Number(size[0]) || node.size[0], Math.max(node.size[1], Number(size[1]) || 0)];
    else fitBesideNeighbours(graph, node);
  }
  graph.ngTop = Object.fromEntries(Object.entries(workflow).filter(([k]) => k !== "nodes" && k !== "format"));
  for (const data of Array.isArray(workflow.ui?.groups) ? workflow.ui.groups : []) {
    const group = new LGraphGroup(String(data.title ?? "Group"));
    const bounds = (data.bounding || []).map(Number);
    if (bounds.length === 4 && bounds.every(Number.isFinite)) group._bounding.set(bounds);
    if (typeof data.color === "string") group.color = data.color;
    graph.add(group);
  }
  graph.setDirtyCanvas(true, true);
  return [...missing];
}

// A file without sizes was laid out for narrower nodes: keep clear of the next node on the right.
function fitBesideNeighbours(graph, node) {
  const [x, y] = node.pos;
  const bottom = y + node.size[1];
  const right = graph._nodes
    .filter((n) => n !== node && n.pos[0] > x && n.pos[1] < bottom && n.pos[1] + n.size[1] > y)
    .map((n) => n.pos[0]);
  if (!right.length) return;
  const room = Math.min(...right) - x - 24;
  node.size[0] = Math.max(Math.min(node.size[0], room), node.computeSize()[0]);
}

function setInputs(node, inputs) {
  node.ngRaw = {}; // input name → value kept as written (cannot be shown, or a refused link)
  node.ngAbsent = new Set(); // inputs the file left out
  node.ngLinkForm = {}; // input name → the output reference as written ("model" or 0)
  for (const spec of node.ngSpec.inputs) {
    const value = inputs[spec.name];
    if (value === undefined) {
      node.ngAbsent.add(spec.name);
      continue;
    }
    if (isLink(value)) {
      if (spec.accepts === "either") node.toSocket(spec.name);
      else if (spec.accepts === "literal") node.ngRaw[spec.name] = value;
      continue;
    }
    const widget = node.ngWidgets[spec.name];
    if (!widget) {
      node.ngRaw[spec.name] = value; // a literal for a link-only input: validation reports it
      continue;
    }
    if (node.ngSockets.has(spec.name)) node.toWidget(spec.name); // e.g. Format's `*` inputs
    node.ngWidgets[spec.name].value = value;
    node.ngWidgets[spec.name].ngLast = value;
  }
  for (const [name, value] of Object.entries(inputs)) {
    if (!node.inputSpec(name)) node.ngRaw[name] = value;
  }
}

function connect(graph, node, name, ref) {
  if (!node?.ngSpec || name in node.ngRaw) return;
  const origin = graph.getNodeById(graphId(String(ref[0])));
  const target = node.findInputSlot(name);
  const slot = origin && origin.ngSpec ? outputSlot(origin, ref[1]) : -1;
  if (target < 0 || slot < 0 || !origin.connect(slot, node, target)) {
    node.ngRaw[name] = ref;
    return;
  }
  node.ngLinkForm[name] = ref[1];
}

// The workflow the graph shows, in the file format.
export function saveWorkflow(graph) {
  const nodes = {};
  const ordered = [...graph._nodes].sort((a, b) => compareIds(String(a.id), String(b.id)));
  for (const node of ordered) nodes[String(node.id)] = nodeData(graph, node);
  const top = graph.ngTop || {};
  const ui = { ...(top.ui || {}) };
  delete ui.groups;
  const groups = (graph._groups || []).map((g) => ({
    title: g.title, color: g.color, bounding: [...g._bounding].map(Math.round),
  }));
  if (groups.length) ui.groups = groups;
  return { format: "nodegraph/1", nodes, ...top, ui };
}

function compareIds(a, b) {
  const na = /^\d+$/.test(a), nb = /^\d+$/.test(b);
  if (na && nb) return Number(a) - Number(b);
  if (na !== nb) return na ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

function nodeData(graph, node) {
  // litegraph keeps pos and size in Float32Arrays: write plain rounded pairs.
  const pair = (v) => [Math.round(v[0]), Math.round(v[1])];
  const ui = { ...(node.ngUi || {}), pos: pair(node.pos), size: pair(node.size) };
  if (!node.ngSpec) return { ...node.ngRaw, ui };
  const data = { type: node.ngSpec.type, inputs: nodeInputs(graph, node) };
  if (node.ngTitle !== undefined || node.title !== node.ngSpec.type) data.title = node.title;
  data.ui = ui;
  const mode = Object.keys(MODE_NAMES).find((name) => MODE_NAMES[name] === node.mode);
  if (mode) data.mode = mode;
  return { ...data, ...(node.ngExtra || {}) };
}

function nodeInputs(graph, node) {
  const inputs = {};
  const raw = node.ngRaw || {};
  for (const spec of node.ngSpec.inputs) {
    const name = spec.name;
    const slot = node.findInputSlot(name);
    const linkId = slot >= 0 ? node.inputs[slot].link : null;
    if (linkId != null && graph.links[linkId]) {
      const link = graph.links[linkId];
      const origin = graph.getNodeById(link.origin_id);
      const form = node.ngLinkForm?.[name];
      const keep = form !== undefined && outputSlot(origin, form) === link.origin_slot;
      inputs[name] = [String(link.origin_id), keep ? form : origin.outputs[link.origin_slot].name];
    } else if (name in raw) {
      inputs[name] = raw[name];
    } else if (node.ngWidgets[name] && !node.ngSockets.has(name)) {
      const value = normalizeValue(spec, node.ngWidgets[name].value);
      const untouched = node.ngAbsent?.has(name) && JSON.stringify(value) === JSON.stringify(spec.default);
      if (!untouched) inputs[name] = value;
    }
  }
  for (const [name, value] of Object.entries(raw)) {
    if (!node.inputSpec(name)) inputs[name] = value;
  }
  return inputs;
}
