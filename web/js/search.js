// The node search (double-click the canvas, "Add node", or drop a dragged link on empty canvas).
// Matches every word typed against a node's type, category, input and output names and types,
// aliases and description, ranks the nodes, and shows each one's description. Opened from a
// dropped link it offers only nodes that can take (or give) the link's type, and connects the one
// picked.

import { createNode, linkCompatible } from "./nodetypes.js";

const LIMIT = 40;
// How much a match in each field counts; an exact word counts 3×, a prefix 2×, a substring 1×.
const WEIGHTS = { type: 10, alias: 8, category: 4, input: 3, output: 3, socket: 2, description: 1 };

function fields(spec) {
  const inputs = spec.inputs.map((i) => i.name.toLowerCase());
  const outputs = spec.outputs.map((o) => o.name.toLowerCase());
  return [
    ["type", [spec.type.toLowerCase()]],
    ["alias", (spec.aliases || []).map((a) => String(a).toLowerCase())],
    ["category", (spec.category || "").toLowerCase().split("/")],
    ["input", inputs],
    ["output", outputs],
    ["socket", [...spec.inputs, ...spec.outputs].map((s) => s.type.toLowerCase())],
    ["description", [(spec.description || "").toLowerCase()]],
  ];
}

function wordScore(word, spec) {
  let best = 0;
  for (const [field, texts] of fields(spec)) {
    for (const text of texts) {
      const found = text === word ? 3 : text.startsWith(word) ? 2 : text.includes(word) ? 1 : 0;
      best = Math.max(best, found * WEIGHTS[field]);
    }
  }
  return best;
}

// Can a node of this spec take a link of `type` (dir "in": the link comes out of an output) or
// give one (dir "out": the link goes into an input)?
export function fits(spec, filter) {
  if (!filter) return true;
  if (filter.dir === "in") {
    return spec.inputs.some((i) => i.accepts !== "literal" && linkCompatible(filter.type, i.type));
  }
  return spec.outputs.some((o) => linkCompatible(o.type, filter.type));
}

export function rankNodes(specs, query, filter) {
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  const ranked = [];
  for (const spec of specs) {
    if (!fits(spec, filter)) continue;
    let score = 0;
    for (const word of words) {
      const s = wordScore(word, spec);
      if (!s) {
        score = -1;
        break;
      }
      score += s;
    }
    if (score >= 0) ranked.push({ spec, score });
  }
  ranked.sort((a, b) => b.score - a.score || a.spec.type.length - b.spec.type.length ||
    a.spec.type.localeCompare(b.spec.type));
  return ranked.slice(0, LIMIT).map((r) => r.spec);
}

export class NodeSearch {
  constructor(canvas, specs) {
    this.canvas = canvas;
    this.specs = specs;
    this.box = document.getElementById("node-search");
    this.input = document.getElementById("node-search-input");
    this.list = document.getElementById("node-search-results");
    this.note = document.getElementById("node-search-filter");
    this.input.addEventListener("input", () => this.render());
    this.input.addEventListener("keydown", (e) => this.key(e));
    document.addEventListener("pointerdown", (e) => {
      if (!this.box.hidden && !this.box.contains(e.target)) this.close();
    }, true);
  }

  // options as litegraph passes them: node_from + slot_from (an output) or node_to + slot_from (an input)
  open(event, options = {}) {
    const rect = this.canvas.canvas.getBoundingClientRect();
    const x = event?.clientX ?? rect.left + rect.width / 2, y = event?.clientY ?? rect.top + 60;
    this.at = this.canvas.ds.convertCanvasToOffset([x - rect.left, y - rect.top]);
    this.link = null;
    this.filter = null;
    const node = options.node_from || options.node_to;
    if (node) {
      const dir = options.node_from ? "in" : "out";
      const slots = (dir === "in" ? node.outputs : node.inputs) || [];
      const slot = typeof options.slot_from === "object" ? slots.indexOf(options.slot_from)
        : typeof options.slot_from === "number" ? options.slot_from
          : slots.findIndex((s) => s.name === options.slot_from);
      if (slot >= 0) {
        this.link = { node, slot, dir };
        this.filter = { dir, type: String(slots[slot].type) };
      }
    }
    this.note.textContent = this.filter
      ? (this.filter.dir === "in" ? `nodes that take ${this.filter.type}` : `nodes that give ${this.filter.type}`) : "";
    this.note.hidden = !this.filter;
    this.input.value = "";
    this.box.hidden = false;
    this.render();
    // Keep the whole box on screen.
    const width = this.box.offsetWidth, height = this.box.offsetHeight;
    this.box.style.left = `${Math.max(4, Math.min(x, window.innerWidth - width - 4))}px`;
    this.box.style.top = `${Math.max(4, Math.min(y, window.innerHeight - height - 4))}px`;
    this.input.focus();
  }

  close() {
    this.box.hidden = true;
    this.canvas.canvas.focus();
  }

  render() {
    this.results = rankNodes(this.specs(), this.input.value, this.filter);
    this.selected = 0;
    const items = this.results.map((spec, i) => {
      const item = document.createElement("li");
      item.dataset.type = spec.type;
      const title = document.createElement("span");
      title.className = "type";
      title.textContent = spec.type;
      const category = document.createElement("span");
      category.className = "category";
      category.textContent = spec.category || "";
      const description = document.createElement("span");
      description.className = "description";
      description.textContent = spec.description || "";
      item.append(title, category, description);
      item.addEventListener("pointerdown", (e) => {
        e.preventDefault();
        this.pick(i);
      });
      return item;
    });
    if (!items.length) {
      const none = document.createElement("li");
      none.className = "none";
      none.textContent = "no node matches";
      items.push(none);
    }
    this.list.replaceChildren(...items);
    this.highlight();
  }

  highlight() {
    [...this.list.children].forEach((li, i) => li.classList.toggle("selected", i === this.selected));
    this.list.children[this.selected]?.scrollIntoView({ block: "nearest" });
  }

  key(e) {
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      const n = this.results.length;
      if (n) this.selected = (this.selected + (e.key === "ArrowDown" ? 1 : n - 1)) % n;
      this.highlight();
    } else if (e.key === "Enter") {
      e.preventDefault();
      this.pick(this.selected);
    } else if (e.key === "Escape") {
      e.preventDefault();
      this.close();
    }
    e.stopPropagation(); // litegraph's keys (Delete, Ctrl+Z) are not for this box
  }

  pick(index) {
    const spec = this.results[index];
    if (!spec) return;
    const graph = this.canvas.graph;
    const node = createNode(spec.type);
    node.pos = [this.at[0], this.at[1]];
    graph.add(node);
    if (this.link) connectNew(this.link, node, this.filter.type);
    this.close();
    this.canvas.selectNode(node);
    graph.onNgChange?.(node, null);
  }
}

// Connect a node just made to the link that was dropped: its first input that takes the type
// (shown as a socket first if it was a widget), or its first output that gives it.
function connectNew({ node: other, slot, dir }, node, type) {
  if (dir === "in") {
    const input = node.ngSpec.inputs.find((i) => i.accepts !== "literal" && linkCompatible(type, i.type));
    if (!input) return;
    if (node.findInputSlot(input.name) < 0) node.toSocket(input.name);
    other.connect(slot, node, node.findInputSlot(input.name));
  } else {
    const output = node.outputs.findIndex((o) => linkCompatible(String(o.type), type));
    if (output >= 0) node.connect(output, other, slot);
  }
}
