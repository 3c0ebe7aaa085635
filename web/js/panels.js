// The status line (connection, queue size, last job, messages) and the errors panel.

export class StatusBar {
  constructor() {
    this.conn = document.getElementById("status-conn");
    this.queue = document.getElementById("status-queue");
    this.job = document.getElementById("status-job");
    this.message = document.getElementById("status-message");
  }

  connection(state) {
    this.conn.dataset.state = state;
    this.conn.textContent = state;
  }

  queueSize(running, pending) {
    this.queue.textContent = `queue ${running + pending}` + (running ? " · running" : "");
    this.queue.dataset.size = String(running + pending);
  }

  jobStatus(text, state) {
    this.job.textContent = text;
    this.job.dataset.state = state || "";
  }

  say(text, kind = "info") {
    this.message.textContent = text;
    this.message.dataset.kind = kind;
  }
}

export class ErrorsPanel {
  // onPick(nodeId): centre the canvas on the node an error names
  constructor({ onPick, nodeTitle }) {
    this.panel = document.getElementById("errors");
    this.list = document.getElementById("error-list");
    this.onPick = onPick;
    this.nodeTitle = nodeTitle;
    document.getElementById("errors-close").addEventListener("click", () => (this.panel.hidden = true));
  }

  show(errors) {
    const items = errors.map((error) => {
      const item = document.createElement("li");
      item.className = "error";
      item.dataset.nodeId = error.node_id ?? "";
      item.dataset.input = error.input ?? "";
      item.dataset.code = error.code ?? "";
      const where = document.createElement("span");
      where.className = "where";
      const node = error.node_id != null ? this.nodeTitle(error.node_id) : "workflow";
      where.textContent = error.input ? `${node} · ${error.input}` : node;
      const message = document.createElement("span");
      message.className = "message";
      message.textContent = error.message;
      const code = document.createElement("code");
      code.textContent = error.code;
      item.append(where, message, code);
      if (error.node_id != null) item.addEventListener("click", () => this.onPick(error.node_id));
      return item;
    });
    this.list.replaceChildren(...items);
    this.panel.hidden = items.length === 0;
  }
}

// The right-hand sidebar: Queue, History and Outputs tabs; the toolbar's button shows or hides it.
export class Sidebar {
  constructor() {
    this.panel = document.getElementById("sidebar");
    this.tabs = [...this.panel.querySelectorAll("[data-tab]")];
    for (const tab of this.tabs) tab.addEventListener("click", () => this.show(tab.dataset.tab));
    this.show("queue");
  }

  show(name) {
    for (const tab of this.tabs) {
      tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
      document.getElementById(tab.getAttribute("aria-controls")).hidden = tab.dataset.tab !== name;
    }
  }

  toggle() {
    this.panel.hidden = !this.panel.hidden;
    return !this.panel.hidden;
  }
}
