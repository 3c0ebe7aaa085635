// The gallery of recent outputs: filled from /api/history, then live as nodes write images.
// Clicking an image opens it large, with a button to open the workflow embedded in it.

import { api, failures, outputURL } from "./api.js";

const LIMIT = 60;
const IMAGE_FILE = /\.(png|jpe?g|webp|gif)$/i;

export class Gallery {
  constructor({ onOpenWorkflow }) {
    this.items = document.getElementById("gallery-items");
    this.lightbox = document.getElementById("lightbox");
    this.names = [];
    this.onOpenWorkflow = onOpenWorkflow;
    this.lightbox.addEventListener("click", (e) => {
      if (e.target === this.lightbox) this.close();
    });
    document.getElementById("lightbox-close").addEventListener("click", () => this.close());
    document.getElementById("lightbox-open").addEventListener("click", () => this.openWorkflow());
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && !this.lightbox.hidden) this.close();
    });
  }

  async load() {
    const { jobs } = await api.history(20);
    const names = jobs.flatMap((job) => job.files || []);
    this.names = [];
    this.add(names.reverse());
  }

  // Newest first; a name seen again moves to the front.
  add(names) {
    for (const name of names) {
      if (!IMAGE_FILE.test(name) || name.startsWith(".temp/")) continue;
      this.names = [name, ...this.names.filter((n) => n !== name)].slice(0, LIMIT);
    }
    this.render();
  }

  render() {
    const figures = this.names.map((name) => {
      const button = document.createElement("button");
      button.className = "thumb";
      button.title = name;
      const image = document.createElement("img");
      image.src = outputURL(name);
      image.alt = name;
      image.loading = "lazy";
      button.append(image);
      button.addEventListener("click", () => this.show(name));
      return button;
    });
    this.items.replaceChildren(...figures);
    if (!figures.length) {
      const empty = document.createElement("p");
      empty.className = "empty";
      empty.textContent = "Images from your runs appear here.";
      this.items.append(empty);
    }
  }

  show(name) {
    this.current = name;
    document.getElementById("lightbox-image").src = outputURL(name);
    document.getElementById("lightbox-name").textContent = name;
    this.lightbox.hidden = false;
  }

  close() {
    this.lightbox.hidden = true;
  }

  async openWorkflow() {
    let blob;
    try {
      const response = await fetch(outputURL(this.current));
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      blob = await response.blob();
    } catch (error) {
      failures.report(`could not read ${this.current}: ${error.message}`);
      return;
    }
    this.close();
    await this.onOpenWorkflow(new File([blob], this.current.split("/").pop(), { type: blob.type }));
  }
}
