// Following runs on the graph: websocket events and job results become each node's run state
// (node.ngRun: status, progress, seconds, images, errors), which runview.js draws.

import { api, outputURL } from "./api.js";

const IMAGE_FILE = /\.(png|jpe?g|webp|gif)$/i;

export class RunTracker {
  // hooks: onJobDone(job), onFiles(names), onErrors(errors), onChange(), asRunChange(change)
  constructor(graph, hooks) {
    this.graph = graph;
    this.hooks = hooks;
    this.jobId = null; // the job whose events the graph shows
    this.errors = [];
  }

  node(id) {
    return id == null ? null : this.graph._nodes.find((n) => String(n.id) === String(id)) || null;
  }

  redraw() {
    this.graph.setDirtyCanvas(true, true);
    this.hooks.onChange?.();
  }

  // Forget what the last run showed (images stay until a node makes new ones, like ComfyUI).
  reset({ keepImages = true } = {}) {
    for (const node of this.graph._nodes) {
      const images = keepImages ? node.ngRun?.images : undefined;
      node.ngRun = images ? { images } : {};
    }
    this.errors = [];
    this.hooks.onErrors?.([]);
    this.redraw();
  }

  // Before queueing again: the last errors go, the node states of jobs still running stay.
  clearErrors() {
    for (const node of this.graph._nodes) delete node.ngRun?.errors;
    this.errors = [];
    this.hooks.onErrors?.([]);
    this.redraw();
  }

  // Validation or execution errors: on their nodes, and all of them in the errors panel.
  showErrors(errors) {
    for (const error of errors) {
      const node = this.node(error.node_id);
      if (!node) continue;
      node.ngRun = node.ngRun || {};
      node.ngRun.errors = [...(node.ngRun.errors || []), error];
    }
    this.errors = [...this.errors, ...errors];
    this.hooks.onErrors?.(this.errors);
    this.redraw();
  }

  // The socket carries this page's jobs only; the graph follows whichever of them runs now.
  handle(message) {
    if (message.type === "job_started") {
      this.reset();
      this.jobId = message.job_id;
    }
    if (message.job_id && message.job_id !== this.jobId) return;
    const node = this.node(message.node_id);
    const run = node ? (node.ngRun = node.ngRun || {}) : {};
    switch (message.type) {
      case "job_started":
        for (const id of message.nodes || []) {
          const planned = this.node(id);
          if (planned) planned.ngRun = { ...(planned.ngRun || {}), status: "queued" };
        }
        break;
      case "node_started":
        Object.assign(run, { status: "running", progress: null, info: null });
        break;
      case "node_cached":
        run.status = "cached";
        break;
      case "progress":
        run.status = "running";
        run.progress = { step: message.step, total: message.total };
        if (message.preview) this.setImages(node, [message.preview]);
        break;
      case "node_info":
        run.info = message.message;
        break;
      case "node_finished":
        Object.assign(run, { status: "ran", seconds: message.seconds });
        this.setImages(node, message.files || []);
        break;
      case "node_error":
        run.status = "error";
        this.showErrors([message]);
        break;
      case "interrupted":
        for (const n of this.graph._nodes) if (n.ngRun?.status === "running") n.ngRun.status = "interrupted";
        break;
      case "job_finished":
      case "job_cancelled":
        this.finish(message.job_id);
        break;
      default:
        return;
    }
    this.redraw();
  }

  setImages(node, names) {
    const images = names.filter((n) => IMAGE_FILE.test(n));
    if (!node || !images.length) return;
    node.ngRun.images = images.map((name) => {
      const image = new Image();
      image.addEventListener("load", () => this.redraw());
      image.src = outputURL(name);
      image.ngName = name;
      return image;
    });
    // A node growing to show its images is not an edit of the workflow.
    const resize = this.hooks.asRunChange || ((change) => change());
    resize(() => node.refreshWidgets?.());
    this.hooks.onFiles?.(images.filter((n) => !n.startsWith(".temp/")));
  }

  // The job's record settles every node's final state (cached/ran/error) and Show values.
  async finish(jobId) {
    let job;
    try {
      job = await api.job(jobId);
    } catch {
      return;
    }
    if (jobId !== this.jobId) return;
    this.apply(job);
    this.hooks.onJobDone?.(job);
  }

  // A finished job from the history, shown on its (just opened) workflow: its own node states.
  showJob(job) {
    this.reset({ keepImages: false });
    this.jobId = job.job_id;
    this.apply(job);
  }

  apply(job) {
    for (const node of this.graph._nodes) {
      if (["queued", "running"].includes(node.ngRun?.status) && !job.nodes?.[node.id]) delete node.ngRun.status;
    }
    for (const [id, result] of Object.entries(job.nodes || {})) {
      const node = this.node(id);
      if (!node) continue;
      node.ngRun = node.ngRun || {};
      node.ngRun.status = result.status;
      if (result.seconds != null) node.ngRun.seconds = result.seconds;
      // A cached SaveImage wrote nothing new: its record still names the images it stands for.
      const shownFiles = (node.ngRun.images || []).map((image) => image.ngName).join("\n");
      if (result.files?.length && shownFiles !== result.files.join("\n")) this.setImages(node, result.files);
      const value = result.outputs?.value;
      if (node.ngSpec?.type === "Show" && value !== undefined) node.ngRun.text = JSON.stringify(value);
    }
    const shown = new Set(this.errors.map((e) => `${e.node_id}/${e.input}/${e.code}`));
    this.showErrors((job.errors || []).filter((e) => !shown.has(`${e.node_id}/${e.input}/${e.code}`)));
    this.lastJob = job;
  }
}
