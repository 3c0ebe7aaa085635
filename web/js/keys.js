// Keyboard shortcuts, and where litegraph's own behaviour is replaced: its search box (by
// search.js), delete (which rewired a deleted node's neighbours silently; here only Ctrl+Delete
// does, as one undoable step), its node panel (off-screen, with inline styles the page's CSP
// refuses: double-clicking a node renames it instead), its colour menu (inline styles too), and
// its dialogs, which are kept inside the window.
/* global LiteGraph, LGraphCanvas */

import { BYPASS, MUTE } from "./nodetypes.js";

export function clampIntoView(element) {
  if (!element?.getBoundingClientRect) return element;
  const rect = element.getBoundingClientRect();
  const dx = Math.min(0, window.innerWidth - 8 - rect.right) || Math.max(0, 8 - rect.left);
  const dy = Math.min(0, window.innerHeight - 8 - rect.bottom) || Math.max(0, 8 - rect.top);
  if (dx) element.style.left = `${element.offsetLeft + dx}px`;
  if (dy) element.style.top = `${element.offsetTop + dy}px`;
  return element;
}

function deleteSelected(canvas) {
  canvas.graph.beforeChange();
  for (const node of Object.values(canvas.selected_nodes)) {
    if (!node.block_delete) canvas.graph.remove(node);
  }
  canvas.selected_nodes = {};
  canvas.current_node = null;
  canvas.highlighted_links = {};
  canvas.setDirty(true, true);
  canvas.graph.afterChange();
}

export function installLiteGraphPatches(canvas, search) {
  const proto = LGraphCanvas.prototype;
  const rewiringDelete = proto.deleteSelectedNodes;
  canvas.ngDeleteRewiring = () => rewiringDelete.call(canvas);
  proto.deleteSelectedNodes = function () {
    deleteSelected(this);
  };
  proto.showSearchBox = (event, options) => {
    search.open(event, options);
    return search.box;
  };
  proto.showConnectionMenu = (opts) => search.open(opts.e, opts.nodeFrom
    ? { node_from: opts.nodeFrom, slot_from: opts.slotFrom } : { node_to: opts.nodeTo, slot_from: opts.slotTo });
  const prompt = proto.prompt;
  proto.prompt = function (...args) {
    return clampIntoView(prompt.apply(this, args));
  };
  proto.showShowNodePanel = function (node) {
    const rect = this.canvas.getBoundingClientRect();
    const [x, y] = this.ds.convertOffsetToCanvas(node.pos);
    this.prompt("Title", node.title, (value) => {
      node.title = String(value);
      this.setDirty(true, true);
      node.graph?.onNgChange?.(node, null);
    }, { clientX: rect.left + x, clientY: rect.top + y });
  };
  LGraphCanvas.onMenuNodeColors = (_value, _options, event, menu, node) => {
    const values = [{ value: null, content: "No color" }, ...Object.keys(LGraphCanvas.node_colors)
      .map((name) => ({ value: name, content: name, className: `color-${name}` }))];
    new LiteGraph.ContextMenu(values, {
      event, parentMenu: menu, node,
      callback: (picked) => {
        const color = picked.value ? LGraphCanvas.node_colors[picked.value] : null;
        const isGroup = node.constructor === LiteGraph.LGraphGroup;
        if (!color) {
          delete node.color;
          delete node.bgcolor;
        } else if (isGroup) {
          node.color = color.groupcolor;
        } else {
          Object.assign(node, { color: color.color, bgcolor: color.bgcolor });
        }
        canvas.setDirty(true, true);
        canvas.graph.onNgChange?.(node, null);
      },
    });
    return false;
  };
}

function typing(target) {
  return target instanceof HTMLElement &&
    (["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName) || target.isContentEditable);
}

export function toggleMode(canvas, mode) {
  const nodes = Object.values(canvas.selected_nodes);
  if (!nodes.length) return;
  const all = nodes.every((n) => n.mode === mode);
  for (const node of nodes) node.mode = all ? LiteGraph.ALWAYS : mode;
  canvas.setDirty(true, true);
  canvas.graph.onNgChange?.(nodes[0], null);
}

// actions: save(), queue(), history (UndoHistory), changed()
export function installKeys(canvas, { save, queue, history, changed }) {
  window.addEventListener("keydown", (e) => {
    const mod = e.ctrlKey || e.metaKey;
    const key = e.key.toLowerCase();
    if (mod && key === "s") {
      e.preventDefault();
      save();
      return;
    }
    if (mod && e.key === "Enter") {
      e.preventDefault();
      queue();
      return;
    }
    if (typing(e.target)) return; // the text field's own undo and keys
    const shortcut = () => {
      e.preventDefault();
      e.stopPropagation();
    };
    if (mod && key === "z" && !e.shiftKey) {
      shortcut();
      history.undo();
    } else if (mod && (key === "y" || (key === "z" && e.shiftKey))) {
      shortcut();
      history.redo();
    } else if (mod && key === "b") {
      shortcut();
      toggleMode(canvas, BYPASS);
    } else if (mod && key === "m") {
      shortcut();
      toggleMode(canvas, MUTE);
    } else if (mod && (e.key === "Delete" || e.key === "Backspace")) {
      shortcut();
      canvas.ngDeleteRewiring();
      changed();
    }
  }, true);
}
