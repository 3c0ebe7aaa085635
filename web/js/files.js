// Workflow files: the list in the toolbar, open, save, save as, new, and import by drag and drop
// (POST /api/import takes workflow JSON, ComfyUI API JSON or a PNG written by SaveImage).
// The graph being edited is also kept in localStorage, so a reload does not lose it.

import { api } from "./api.js";
import { loadWorkflow, saveWorkflow } from "./workflow.js";

const STORAGE_KEY = "nodegraph.editor";
const WORKFLOW_NAME = /^[A-Za-z0-9][A-Za-z0-9 _.-]*\.json$/;

export function workflowName(text) {
  let name = text.trim().replace(/[^A-Za-z0-9 _.-]/g, "_").replace(/^[^A-Za-z0-9]+/, "");
  if (!name.toLowerCase().endsWith(".json")) name += ".json";
  return WORKFLOW_NAME.test(name) && !name.includes("..") ? name : null;
}

export class WorkflowFiles {
  // hooks: onLoaded(missingTypes), onProblem(errors), status (StatusBar)
  constructor(graph, hooks) {
    this.graph = graph;
    this.hooks = hooks;
    this.name = null;
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
    this.list.value = workflows.includes(this.name) ? this.name : "";
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
      localStorage.setItem(STORAGE_KEY, JSON.stringify({ name: this.name, saved: this.savedText, workflow: text }));
    } catch {
      // storage full or disabled: the editor works without it
    }
  }

  restore() {
    try {
      const state = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
      if (!state?.workflow) return false;
      this.show(JSON.parse(state.workflow), state.name);
      this.savedText = state.saved || "";
      this.update();
      return true;
    } catch {
      return false;
    }
  }

  // `saved`: the workflow is what its file holds (opened, or new and empty), not an unsaved import.
  show(workflow, name, saved = Boolean(name)) {
    const missing = loadWorkflow(this.graph, workflow);
    this.name = name;
    this.savedText = saved ? this.text() : "";
    this.list.value = name && [...this.list.options].some((o) => o.value === name) ? name : "";
    this.hooks.onLoaded(missing);
    this.update();
  }

  confirmDiscard() {
    return !this.dirty() || !this.graph._nodes.length || window.confirm("Discard the unsaved changes?");
  }

  async open(name) {
    if (!this.confirmDiscard()) {
      this.list.value = this.name || "";
      return;
    }
    try {
      this.show(await api.openWorkflow(name), name);
      this.hooks.status.say(`opened ${name}`);
    } catch (error) {
      this.hooks.onProblem(error.errors || [], `could not open ${name}: ${error.message}`);
    }
  }

  newGraph() {
    if (!this.confirmDiscard()) return;
    this.show({ format: "nodegraph/1", nodes: {}, ui: {} }, null, true);
  }

  async save() {
    if (!this.name) return this.saveAs();
    await this.write(this.name);
  }

  async saveAs() {
    const input = document.getElementById("name-input");
    input.value = this.name ? this.name.replace(/\.json$/, "-copy.json") : "untitled.json";
    this.dialog.returnValue = "";
    this.dialog.showModal();
    input.select();
    const answer = await new Promise((resolve) =>
      this.dialog.addEventListener("close", () => resolve(this.dialog.returnValue), { once: true }));
    if (answer !== "ok") return;
    const name = workflowName(input.value);
    if (!name) {
      this.hooks.status.say(`"${input.value}" is not a workflow name (letters, digits, space, _ . -)`, "error");
      return;
    }
    if ([...this.list.options].some((o) => o.value === name) && name !== this.name &&
        !window.confirm(`Replace ${name}?`)) return;
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
    this.show(data.workflow, null);
    this.hooks.status.say(`imported ${file.name}`);
  }
}
