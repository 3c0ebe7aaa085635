// Lists computed from files (checkpoints, LoRAs, input images, every COMBO of file names) refresh
// from the server's catalog: when a combo opens, when the window gets the focus back (after
// copying a file into a models folder), and from the toolbar's ⟳ button. A combo that is open
// when new choices arrive is reopened with them.
/* global LiteGraph */

import { api } from "./api.js";

export class ChoiceRefresher {
  // specs(): the catalog's node specs, whose `choices` the widgets read
  constructor(canvas, specs) {
    this.canvas = canvas;
    this.specs = specs;
    this.inFlight = null;
    this.lastEvent = null;
    canvas.canvas.addEventListener("pointerdown", (e) => (this.lastEvent = e), true);
  }

  // A combo is opening: refresh, and reopen it if its choices changed meanwhile.
  opening(node, widget) {
    const event = this.lastEvent;
    const before = JSON.stringify(widget.ngSpec?.choices || []);
    this.refresh().then(() => {
      const now = widget.ngSpec?.choices || [];
      if (JSON.stringify(now) === before || !document.querySelector(".litecontextmenu") || !event) return;
      LiteGraph.closeAllContextMenus();
      new LiteGraph.ContextMenu(now, {
        scale: Math.max(1, this.canvas.ds.scale), event, className: "dark",
        callback: (value) => {
          widget.value = value;
          widget.callback?.(value, this.canvas, node);
          this.canvas.setDirty(true, true);
        },
      });
    });
  }

  refresh() {
    if (this.inFlight) {
      // The refresh under way may have listed the folders before this call: one more after it.
      this.queued = this.queued || this.inFlight.then(() => {
        this.queued = null;
        return this.refresh();
      });
      return this.queued;
    }
    this.inFlight = api.nodes().then((catalog) => {
      let changed = 0;
      for (const spec of this.specs()) {
        const fresh = catalog.nodes[spec.type];
        if (!fresh) continue;
        for (const input of spec.inputs) {
          const now = fresh.inputs.find((i) => i.name === input.name)?.choices;
          if (!now || JSON.stringify(now) === JSON.stringify(input.choices)) continue;
          input.choices = now;
          changed += 1;
        }
      }
      if (changed) this.canvas.setDirty(true, true);
      return changed;
    }).catch(() => 0) // api.js has shown the failure
      .finally(() => (this.inFlight = null));
    return this.inFlight;
  }
}
