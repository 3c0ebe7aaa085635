// The editor's entry point: builds node types from /api/nodes, sets up the litegraph canvas,
// and wires the toolbar, the websocket, run display, gallery and drag-and-drop import together.
/* global LiteGraph, LGraph, LGraphCanvas */

import { api } from "./api.js";
import { WorkflowFiles } from "./files.js";
import { Gallery } from "./gallery.js";
import { createNode, fitWidgetText, linkCompatible, registerCatalog, TYPE_COLORS } from "./nodetypes.js";
import { ErrorsPanel, StatusBar } from "./panels.js";
import { RunTracker } from "./runs.js";
import { drawRunOverlay } from "./runview.js";
import { EventSocket, newClientId } from "./socket.js";
import { saveWorkflow } from "./workflow.js";

const $ = (id) => document.getElementById(id);

function configureLiteGraph() {
  const socketType = (t) => (t === "" || t === 0 || t == null ? "*" : String(t));
  // Every connection path (dragging, the API, paste) asks this: wrong types are refused.
  LiteGraph.isValidConnection = (output, input) => linkCompatible(socketType(output), socketType(input));
  LiteGraph.search_hide_on_mouse_leave = false;
  LiteGraph.search_show_all_on_open = true;
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
  registerCatalog(await api.nodes());

  const graph = new LGraph();
  const canvas = new LGraphCanvas($("graph-canvas"), graph);
  canvas.onDrawForeground = (ctx) => drawRunOverlay(graph, ctx);
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
  const tracker = new RunTracker(graph, {
    onErrors: (errors) => errorsPanel.show(errors),
    onFiles: (names) => gallery.add(names),
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

  // Unsaved-changes marker: recomputed once per burst of edits.
  let pending = false;
  const changed = () => {
    if (pending) return;
    pending = true;
    setTimeout(() => {
      pending = false;
      files.update();
    }, 0);
  };
  graph.onNgChange = changed;
  graph.onNodeAdded = changed;
  graph.onNodeRemoved = changed;
  graph.onAfterChange = changed;
  canvas.onNodeMoved = changed;
  $("graph-canvas").addEventListener("pointerup", changed);

  const refreshQueue = async () => {
    const { running, pending: waiting } = await api.jobs();
    status.queueSize(running.length, waiting.length);
  };

  async function queue() {
    tracker.reset();
    const { ok, data } = await api.queue(saveWorkflow(graph), clientId);
    if (ok) {
      if (tracker.jobId !== data.job_id) status.say(`queued job ${data.job_id.slice(0, 8)}`);
      if (data.position > 0) status.jobStatus(`queued at position ${data.position}`, "pending");
      return data.job_id;
    }
    const errors = data?.errors || [];
    tracker.showErrors(errors);
    status.say(`not queued: ${errors.length} problem${errors.length === 1 ? "" : "s"} in the workflow`, "error");
    return null;
  }

  const clientId = newClientId();
  new EventSocket(clientId, {
    onState: (state) => status.connection(state),
    onMessage: (message) => {
      if (message.type === "hello") status.queueSize(message.queue?.running ?? 0, message.queue?.pending ?? 0);
      if (["job_queued", "job_started", "job_finished", "job_cancelled"].includes(message.type)) {
        refreshQueue().catch(() => {});
      }
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
  $("btn-queue").addEventListener("click", () => queue());
  $("btn-cancel").addEventListener("click", () => tracker.jobId && api.cancel(tracker.jobId).catch(() => {}));
  $("btn-gallery").addEventListener("click", (e) => {
    e.currentTarget.setAttribute("aria-pressed", String(gallery.toggle()));
  });
  $("btn-add").addEventListener("click", () => {
    const rect = $("graph-canvas").getBoundingClientRect();
    LGraphCanvas.active_canvas = canvas; // litegraph sets it on the first click in the canvas
    canvas.showSearchBox({ clientX: rect.left + rect.width / 2 - 150, clientY: rect.top + 60, layerY: 60 });
  });
  window.addEventListener("keydown", (e) => {
    const mod = e.ctrlKey || e.metaKey;
    if (mod && e.key.toLowerCase() === "s") {
      e.preventDefault();
      files.save();
    } else if (mod && e.key === "Enter") {
      e.preventDefault();
      queue();
    }
  }, true);
  installDrop((file) => files.importFile(file));

  await files.refreshList();
  if (!files.restore()) files.newGraph();
  gallery.load().catch(() => {});
  window.nodegraph = { graph, canvas, files, tracker, gallery, queue, createNode, fitView: () => fitView(canvas, graph) };
  document.body.dataset.ready = "true";
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
