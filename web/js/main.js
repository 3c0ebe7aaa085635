// The editor's entry point: builds node types from /api/nodes, sets up the litegraph canvas,
// and wires the toolbar, the websocket, run display, gallery and drag-and-drop import together.
/* global LiteGraph, LGraph, LGraphCanvas */

import { api, failures } from "./api.js";
import { WorkflowFiles } from "./files.js";
import { Gallery } from "./gallery.js";
import { JobPanels } from "./jobs.js";
import { installKeys, installLiteGraphPatches } from "./keys.js";
import { ChoiceRefresher } from "./models.js";
import { createNode, fitWidgetText, linkCompatible, registerCatalog, TYPE_COLORS, widgetHooks } from "./nodetypes.js";
import { ErrorsPanel, Sidebar, StatusBar } from "./panels.js";
import { RunTracker } from "./runs.js";
import { drawRunOverlay } from "./runview.js";
import { NodeSearch } from "./search.js";
import { EventSocket, newClientId } from "./socket.js";
import { UndoHistory } from "./undo.js";
import { controlAfterGenerate, endFrame, uploadImage } from "./widgets.js";
import { loadWorkflow, saveWorkflow } from "./workflow.js";

const $ = (id) => document.getElementById(id);

function configureLiteGraph() {
  const socketType = (t) => (t === "" || t === 0 || t == null ? "*" : String(t));
  // Every connection path (dragging, the API, paste) asks this: wrong types are refused.
  LiteGraph.isValidConnection = (output, input) => linkCompatible(socketType(output), socketType(input));
  LiteGraph.release_link_on_empty_shows_menu = true; // opens the node search, filtered by the link's type
  Object.assign(LGraphCanvas.link_type_colors, TYPE_COLORS);
  fitWidgetText();
  // litegraph's number prompt tries eval() on what was typed; this page's CSP forbids eval, so
  // the prompt gets a plain number parser instead (the widget keeps its value on NaN).
  const prompt = LGraphCanvas.prototype.prompt;
  LGraphCanvas.prototype.prompt = function (title, value, callback, event, multiline) {
    const safe = (v) => {
      const saved = window.eval;
      window.eval = Number;
      try {
        return callback(v);
      } finally {
        window.eval = saved;
      }
    };
    return prompt.call(this, title, value, safe, event, multiline);
  };
}

function fitView(canvas, graph) {
  const nodes = graph._nodes;
  const { width, height } = canvas.canvas;
  if (!nodes.length || !width || !height) {
    canvas.ds.scale = 1;
    canvas.ds.offset = [0, 0];
  } else {
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    const left = Math.min(...nodes.map((n) => n.pos[0]));
    const top = Math.min(...nodes.map((n) => n.pos[1] - title));
    const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
    const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const scale = Math.min(1.2, 0.9 * Math.min(width / (right - left + 40), height / (bottom - top + 120)));
    canvas.ds.scale = Math.max(0.2, scale);
    canvas.ds.offset = [width / 2 / canvas.ds.scale - (left + right) / 2,
      height / 2 / canvas.ds.scale - (top + bottom) / 2 + 20];
  }
  canvas.setDirty(true, true);
}

async function boot() {
  configureLiteGraph();
  const status = new StatusBar();
  failures.report = (message) => status.say(message, "error");
  const catalog = await api.nodes();
  registerCatalog(catalog);
  const specs = () => Object.values(catalog.nodes);

  const graph = new LGraph();
  const canvas = new LGraphCanvas($("graph-canvas"), graph);
  canvas.onDrawForeground = (ctx) => {
    drawRunOverlay(graph, ctx);
    endFrame();
  };
  const search = new NodeSearch(canvas, specs);
  installLiteGraphPatches(canvas, search);
  const models = new ChoiceRefresher(canvas, specs);
  widgetHooks.onChoices = (node, widget) => models.opening(node, widget);
  widgetHooks.onUpload = (node, spec) => pickFile("image/*", (file) => uploadImage(node, spec, file)
    .then((name) => status.say(`uploaded ${name}`)).catch(() => {}));
  window.addEventListener("focus", () => models.refresh());
  canvas.show_info = false;
  canvas.render_canvas_border = false;
  const box = $("canvas-box");
  new ResizeObserver(() => canvas.resize(box.clientWidth, box.clientHeight)).observe(box);
  canvas.resize(box.clientWidth, box.clientHeight);

  const errorsPanel = new ErrorsPanel({
    onPick: (id) => {
      const node = graph.getNodeById(id) ?? graph._nodes.find((n) => String(n.id) === String(id));
      if (node) {
        canvas.centerOnNode(node);
        canvas.selectNode(node);
      }
    },
    nodeTitle: (id) => {
      const node = graph._nodes.find((n) => String(n.id) === String(id));
      return node ? `${node.title} #${id}` : `node ${id}`;
    },
  });
  const gallery = new Gallery({ onOpenWorkflow: (file) => files.importFile(file) });
  const sidebar = new Sidebar();
  const panels = new JobPanels({
    onCounts: ({ running, pending }) => status.queueSize(running, pending),
    onImage: (name) => gallery.show(name),
    onOpen: (job) => {
      if (!files.confirmDiscard()) return;
      files.show(job.workflow, null);
      tracker.showJob(job);
      status.say(`opened the workflow of job ${job.job_id.slice(0, 8)}`);
    },
  });
  const tracker = new RunTracker(graph, {
    onErrors: (errors) => errorsPanel.show(errors),
    onFiles: (names) => gallery.add(names),
    asRunChange: (change) => {
      const before = files.text();
      change();
      const after = files.text();
      files.absorb(before, after);
      history.absorb(before, after);
    },
    onJobDone: (job) => {
      const seconds = job.finished - job.started; // epoch seconds in the job's record
      const took = Number.isFinite(seconds) ? ` in ${seconds.toFixed(1)} s` : "";
      status.jobStatus(`last job: ${job.status}${took}`, job.status);
      $("btn-cancel").disabled = true;
    },
  });
  const files = new WorkflowFiles(graph, {
    status,
    onLoaded: (missing) => {
      history.reset();
      tracker.reset({ keepImages: false });
      fitView(canvas, graph);
      if (missing.length) status.say(`unknown node types: ${missing.join(", ")}`, "error");
    },
    onProblem: (errors, message) => {
      tracker.reset();
      tracker.showErrors(errors);
      status.say(message, "error");
    },
  });

  // Undo steps: snapshots of the workflow; restoring one keeps the view and what runs showed.
  const history = new UndoHistory({
    snapshot: () => files.text(),
    restore: (text) => {
      const runs = new Map(graph._nodes.map((n) => [String(n.id), n.ngRun]));
      canvas.deselectAllNodes();
      loadWorkflow(graph, JSON.parse(text));
      for (const node of graph._nodes) node.ngRun = runs.get(String(node.id)) || {};
      for (const node of graph._nodes) node.refreshWidgets?.();
      files.update();
    },
  });

  // Unsaved-changes marker and undo steps: recomputed once per burst of edits.
  let pending = false;
  const changed = () => {
    if (pending) return;
    pending = true;
    setTimeout(() => {
      pending = false;
      if (!document.activeElement?.classList.contains("node-text")) history.record();
      files.update();
    }, 0);
  };
  graph.onNgChange = changed;
  graph.onNodeAdded = changed;
  graph.onNodeRemoved = changed;
  graph.onAfterChange = changed;
  canvas.onNodeMoved = changed;
  // Group edits, menus and typing end with one of these: each may have changed the graph.
  document.addEventListener("pointerup", changed, true);
  document.addEventListener("keyup", changed, true);

  async function queue() {
    tracker.clearErrors();
    let reply;
    try {
      reply = await api.queue(saveWorkflow(graph), clientId);
    } catch {
      return null; // the server is not reachable: api.js has said so
    }
    const { ok, status: code, data } = reply;
    if (ok) {
      if (tracker.jobId !== data.job_id) status.say(`queued job ${data.job_id.slice(0, 8)}`);
      if (data.position > 0) status.jobStatus(`queued at position ${data.position}`, "pending");
      if (controlAfterGenerate(graph).length) changed();
      panels.refresh();
      return data.job_id;
    }
    if (code >= 500) return null;
    const errors = data?.errors || [];
    tracker.showErrors(errors);
    status.say(`not queued: ${errors.length} problem${errors.length === 1 ? "" : "s"} in the workflow`, "error");
    return null;
  }

  const clientId = newClientId();
  new EventSocket(clientId, {
    onState: (state) => status.connection(state),
    onMessage: (message) => {
      if (message.type === "hello") {
        status.queueSize(message.queue?.running ?? 0, message.queue?.pending ?? 0);
        panels.refresh();
      }
      if (["job_queued", "job_started", "job_finished", "job_cancelled"].includes(message.type)) panels.refresh();
      if (message.type === "job_started") {
        status.jobStatus("running…", "running");
        status.say("");
        $("btn-cancel").disabled = false;
      } else if (message.type === "job_cancelled") {
        status.jobStatus("last job: cancelled", "cancelled");
      }
      tracker.handle(message);
    },
  });

  $("btn-new").addEventListener("click", () => files.newGraph());
  $("btn-save").addEventListener("click", () => files.save());
  $("btn-save-as").addEventListener("click", () => files.saveAs());
  $("btn-import").addEventListener("click", () => pickFile(".json,application/json,.png,image/png",
    (file) => files.importFile(file)));
  $("btn-queue").addEventListener("click", () => queue());
  $("btn-cancel").addEventListener("click", () => tracker.jobId && api.cancel(tracker.jobId).catch(() => {}));
  $("btn-gallery").addEventListener("click", (e) => {
    e.currentTarget.setAttribute("aria-pressed", String(sidebar.toggle()));
  });
  $("btn-refresh").addEventListener("click", async () => {
    const changes = await models.refresh();
    status.say(changes ? "model lists refreshed" : "model lists are up to date");
  });
  $("btn-add").addEventListener("click", () => {
    const rect = $("graph-canvas").getBoundingClientRect();
    search.open({ clientX: rect.left + rect.width / 2 - 200, clientY: rect.top + 60 });
  });
  installKeys(canvas, { save: () => files.save(), queue, history, changed });
  installDrop((file) => files.importFile(file));

  await files.refreshList();
  if (!files.restore()) await files.openDefault();
  gallery.load().catch(() => {});
  window.nodegraph = {
    graph, canvas, files, tracker, gallery, panels, history, models, search, queue, createNode,
    fitView: () => fitView(canvas, graph),
  };
  document.body.dataset.ready = "true";
}

// The browser's file picker (Import…, LoadImage's upload button): calls `use` with the chosen file.
function pickFile(accept, use) {
  const input = $("file-input");
  input.accept = accept;
  input.value = "";
  input.onchange = () => input.files[0] && use(input.files[0]);
  input.click();
}

// Dropping a file anywhere imports it; litegraph's own drop handling never sees it.
function installDrop(importFile) {
  const hint = $("drop-hint");
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  window.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    hint.hidden = false;
  }, true);
  window.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) hint.hidden = true;
  }, true);
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.stopPropagation();
    hint.hidden = true;
    const file = e.dataTransfer.files[0];
    if (file) importFile(file);
  }, true);
}

boot().catch((error) => {
  $("status-message").textContent = `the editor could not start: ${error.message}`;
  $("status-message").dataset.kind = "error";
});
