// The queue panel (running and pending jobs, each with Cancel) and the history panel (finished
// jobs with their status, time and thumbnails; Open loads the job's workflow and its node states).
// Both refresh when the websocket reports a job queued, started, finished or cancelled.

import { api, outputURL } from "./api.js";

const HISTORY_LIMIT = 30;
const IMAGE_FILE = /\.(png|jpe?g|webp|gif)$/i;

function el(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function when(seconds) {
  return Number.isFinite(seconds) ? new Date(seconds * 1000).toLocaleTimeString() : "";
}

function took(job) {
  const seconds = job.finished - job.started;
  return Number.isFinite(seconds) ? `${seconds.toFixed(1)} s` : "";
}

// A job's images: those it wrote, and those its cached SaveImage nodes stand for.
function jobImages(job) {
  const names = [...(job.files || []), ...Object.values(job.nodes || {}).flatMap((n) => n.files || [])];
  return [...new Set(names)].filter((n) => IMAGE_FILE.test(n) && !n.startsWith(".temp/"));
}

export class JobPanels {
  // hooks: onOpen(job) loads a finished job's workflow; onImage(name) shows an image
  constructor(hooks) {
    this.hooks = hooks;
    this.queue = document.getElementById("queue-items");
    this.history = document.getElementById("history-items");
    this.pending = null;
  }

  // Refreshes coalesce: a burst of websocket events costs one request per list, and an event that
  // arrives while a refresh is under way gets one more after it (which sees what the event did).
  refresh() {
    if (this.pending) {
      this.again = true;
      return this.pending;
    }
    this.again = false;
    this.pending = Promise.all([this.refreshQueue(), this.refreshHistory()])
      .catch(() => {}) // api.js has shown the failure
      .finally(() => {
        this.pending = null;
        if (this.again) this.refresh();
      });
    return this.pending;
  }

  async refreshQueue() {
    const { running, pending } = await api.jobs();
    this.counts = { running: running.length, pending: pending.length };
    const items = [...running, ...pending].map((job) => {
      const item = el("li", "job");
      item.dataset.jobId = job.job_id;
      item.dataset.status = job.status;
      const label = job.status === "running" ? "running" : `pending #${job.position ?? ""}`;
      item.append(el("span", "status", label), el("span", "id", job.job_id.slice(0, 8)),
        el("span", "time", when(job.created)));
      const cancel = el("button", "cancel", "Cancel");
      cancel.title = "Cancel this job";
      cancel.addEventListener("click", async () => {
        cancel.disabled = true;
        try {
          await api.cancel(job.job_id);
        } catch {
          cancel.disabled = false;
          return;
        }
        this.refresh();
      });
      item.append(cancel);
      return item;
    });
    if (!items.length) items.push(el("li", "empty", "No job is waiting or running."));
    this.queue.replaceChildren(...items);
    this.hooks.onCounts?.(this.counts);
  }

  async refreshHistory() {
    const { jobs } = await api.history(HISTORY_LIMIT);
    const items = jobs.map((job) => {
      const item = el("li", "job");
      item.dataset.jobId = job.job_id;
      item.dataset.status = job.status;
      const head = el("div", "head");
      head.append(el("span", "status", job.status), el("span", "id", job.job_id.slice(0, 8)),
        el("span", "time", `${when(job.finished)} · ${took(job)}`));
      const open = el("button", "open", "Open");
      open.title = "Open this job's workflow, with its node states";
      open.addEventListener("click", () => this.hooks.onOpen(job));
      head.append(open);
      const thumbs = el("div", "thumbs");
      for (const name of jobImages(job).slice(0, 4)) {
        const button = el("button", "thumb");
        button.title = name;
        const image = el("img");
        image.src = outputURL(name);
        image.alt = name;
        image.loading = "lazy";
        button.append(image);
        button.addEventListener("click", () => this.hooks.onImage(name));
        thumbs.append(button);
      }
      item.append(head, thumbs);
      return item;
    });
    if (!items.length) items.push(el("li", "empty", "Finished jobs appear here."));
    this.history.replaceChildren(...items);
  }
}
