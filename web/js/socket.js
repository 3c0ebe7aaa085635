// The websocket of server events (/api/ws): reconnects with a backoff and reports its state.

export function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class EventSocket {
  constructor(clientId, { onMessage, onState }) {
    this.clientId = clientId;
    this.onMessage = onMessage;
    this.onState = onState;
    this.delay = 500;
    this.connect();
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/api/ws?client_id=${encodeURIComponent(this.clientId)}`);
    this.onState("connecting");
    ws.addEventListener("open", () => {
      this.delay = 500;
      this.onState("connected");
    });
    ws.addEventListener("message", (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return; // not ours to interpret
      }
      this.onMessage(message);
    });
    ws.addEventListener("close", () => {
      this.onState("disconnected");
      setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(this.delay * 2, 10000);
    });
    this.ws = ws;
  }
}
