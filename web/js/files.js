// Workflow files: the list in the toolbar (subfolders' files as "comfyui/name.json"), open, save,
// save as, new, and import by drag and drop or the file picker (POST /api/import takes workflow
// JSON, ComfyUI API JSON or a PNG written by SaveImage). The graph being edited is also kept in
// localStorage, so a reload does not lose it; a first visit opens DEFAULT_WORKFLOW.

import { api } from "./api.js";
import { loadWorkflow, saveWorkflow } from "./workflow.js";

const STORAGE_KEY = "nodegraph.editor";
const WORKFLOW_NAME = /^(?:[A-Za-z0-9][A-Za-z0-9 _.-]*\/)*[A-Za-z0-9][A-Za-z0-9 _.-]*\.json$/;
export const DEFAULT_WORKFLOW = "lora.json"; // what a first visit opens, as ComfyUI opens its default graph

// A name the server takes, from what was typed: "/" separates folders ("comfyui/mine").
export function workflowName(text) {
  const parts = text.split("/").map((part) => part.trim().replace(/[^A-Za-z0-9 _.-]/g, "_")
    .replace(/^[^A-Za-z0-9]+/, "")).filter(Boolean);
  let name = parts.join("/");
  if (!name.toLowerCase().endsWith(".json")) name += ".json";
  return WORKFLOW_NAME.test(name) && !name.includes("..") ? name : null;
}

// The name a dropped or picked file gives its workflow: "cat_00001_.png" → "cat_00001_.json".
export function importedName(fileName) {
  return workflowName(fileName.replace(/\.[^.]*$/, ""));
}

export class WorkflowFiles {
  // hooks: onLoaded(missingTypes), onProblem(errors), status (StatusBar)
  constructor(graph, hooks) {
    this.graph = graph;
    this.hooks = hooks;
    this.name = null;
    // Whether `name`'s file holds this graph (opened or saved here), rather than the name being
    // taken from an imported file: saving over a file the editor did not open asks first.
    this.stored = false;
    this.savedText = "";
    this.list = document.getElementById("workflow-list");
    this.label = document.getElementById("workflow-name");
    this.dialog = document.getElementById("name-dialog");
    this.list.addEventListener("change", () => {
      if (this.list.value) this.open(this.list.value);
    });
  }

  async refreshList() {
    const { workflows } = await api.workflows();
    const options = workflows.map((name) => new Option(name, name));
    this.list.replaceChildren(new Option("open…", ""), ...options);
    this.list.value = this.stored && workflows.includes(this.name) ? this.name : "";
  }

  listed(name) {
    return [...this.list.options].some((o) => o.value === name);
  }

  text() {
    return JSON.stringify(saveWorkflow(this.graph));
  }

  // A change the editor made itself (not the user): a saved workflow stays saved through it.
  absorb(before, after) {
    if (this.savedText === before) this.savedText = after;
  }

  dirty() {
    return this.text() !== this.savedText;
  }

  // Show the name, with a dot while there are unsaved changes; remember the graph.
  update() {
    const text = this.text();
    const dirty = text !== this.savedText;
    this.label.textContent = (this.name || "untitled") + (dirty ? " ●" : "");
    this.label.dataset.dirty = String(dirty);
    document.title = `${dirty ? "● " : ""}${this.name || "untitled"} — nodegraph`;
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify({ name: this.name, stored: this.stored, saved: this.savedText,
        workflow: text }));
    } catch {
      // storage full or disabled: the editor works without it
    }
  }

  restore() {
    try {
      const state = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
      if (!state?.workflow) return false;
      this.show(JSON.parse(state.workflow), state.name, true, state.stored ?? Boolean(state.name));
      this.savedText = state.saved || "";
      this.update();
      return true;
    } catch {
      return false;
    }
  }

  // `saved`: nothing to save (opened, or new and empty), not an unsaved import; `stored`: the
  // file `name` holds this workflow.
  show(workflow, name, saved = Boolean(name), stored = saved && Boolean(name)) {
    const missing = loadWorkflow(this.graph, workflow);
    this.name = name;
    this.stored = stored;
    this.savedText = saved ? this.text() : "";
    this.list.value = name && stored && this.listed(name) ? name : "";
    this.hooks.onLoaded(missing);
    this.update();
  }

  confirmDiscard() {
    return !this.dirty() || !this.graph._nodes.length || window.confirm("Discard the unsaved changes?");
  }

  async open(name) {
    if (!this.confirmDiscard()) {
      this.list.value = this.stored ? this.name || "" : "";
      return;
    }
    let workflow;
    try {
      workflow = await api.openWorkflow(name);
    } catch (error) {
      this.hooks.onProblem(error.errors || [], `could not open ${name}: ${error.message}`);
      return;
    }
    if (workflow?.format === "nodegraph/1") {
      this.show(workflow, name);
      this.hooks.status.say(`opened ${name}`);
      return;
    }
    // Another format (ComfyUI's API format in workflows/comfyui/): the server converts it. Saving
    // would write it back in this format, so the file counts as not holding this graph.
    const { ok, data } = await api.importFile(new Blob([JSON.stringify(workflow)], { type: "application/json" }));
    if (!ok) {
      const errors = data?.errors || [];
      this.hooks.onProblem(errors, `could not open ${name}: ${errors[0]?.message || "refused"}`);
      return;
    }
    this.show(data.workflow, name, true, false);
    this.list.value = name;
    this.hooks.status.say(`opened ${name} (converted: Save writes it in nodegraph's format)`);
  }

  // A first visit: the default workflow when the folder has it, else an empty canvas.
  async openDefault() {
    if (this.listed(DEFAULT_WORKFLOW)) await this.open(DEFAULT_WORKFLOW);
    if (this.name !== DEFAULT_WORKFLOW) this.newGraph();
  }

  newGraph() {
    if (!this.confirmDiscard()) return;
    this.show({ format: "nodegraph/1", nodes: {}, ui: {} }, null, true);
  }

  async save() {
    if (!this.name) return this.saveAs();
    if (!this.stored && this.listed(this.name) && !window.confirm(`Replace ${this.name}?`)) return;
    await this.write(this.name);
  }

  async saveAs() {
    const input = document.getElementById("name-input");
    input.value = !this.name ? "untitled.json" : this.stored ? this.name.replace(/\.json$/, "-copy.json") : this.name;
    this.dialog.returnValue = "";
    this.dialog.showModal();
    input.select();
    const answer = await new Promise((resolve) =>
      this.dialog.addEventListener("close", () => resolve(this.dialog.returnValue), { once: true }));
    if (answer !== "ok") return;
    const name = workflowName(input.value);
    if (!name) {
      this.hooks.status.say(`"${input.value}" is not a workflow name (letters, digits, space, _ . -, / for a folder)`,
        "error");
      return;
    }
    if (this.listed(name) && !(name === this.name && this.stored) && !window.confirm(`Replace ${name}?`)) return;
    await this.write(name);
  }

  async write(name) {
    const text = this.text();
    try {
      await api.saveWorkflow(name, JSON.parse(text));
    } catch (error) {
      this.hooks.onProblem(error.errors || [], `could not save ${name}: ${error.message}`);
      return;
    }
    this.name = name;
    this.stored = true;
    this.savedText = text;
    this.update();
    await this.refreshList();
    this.hooks.status.say(`saved ${name}`);
  }

  async importFile(file) {
    if (!this.confirmDiscard()) return;
    const { ok, data } = await api.importFile(file);
    if (!ok) {
      const errors = data?.errors || [];
      this.hooks.onProblem(errors, `could not import ${file.name}: ${errors[0]?.message || "refused"}`);
      return;
    }
    this.show(data.workflow, importedName(file.name), false);
    this.hooks.status.say(`imported ${file.name}`);
  }
}
