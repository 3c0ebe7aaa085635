// The server's HTTP API, as small async functions. Every request stays on this page's origin.

// `body` is sent as JSON, or as it is when it is a Blob (a dropped file).
async function request(method, path, body) {
  const init = { method, headers: {} };
  if (body instanceof Blob) {
    init.body = body;
    init.headers["Content-Type"] = body.type || "application/octet-stream";
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { errors: [{ node_id: null, input: null, code: "http", message: text.slice(0, 200) }] };
  }
  return { ok: response.ok, status: response.status, data };
}

async function json(method, path, body) {
  const { ok, status, data } = await request(method, path, body);
  if (!ok) {
    const message = data?.errors?.map((e) => e.message).join("; ") || data?.error || `HTTP ${status}`;
    throw new ApiError(message, status, data?.errors || []);
  }
  return data;
}

export class ApiError extends Error {
  constructor(message, status, errors) {
    super(message);
    this.status = status;
    this.errors = errors;
  }
}

const enc = encodeURIComponent;

export const api = {
  nodes: () => json("GET", "/api/nodes"),
  validate: (workflow) => json("POST", "/api/validate", { workflow }),
  // Resolves to {ok, status, data}: a 400 carries validation errors the editor shows on nodes.
  queue: (workflow, clientId) => request("POST", "/api/jobs", { workflow, client_id: clientId }),
  job: (jobId) => json("GET", `/api/jobs/${enc(jobId)}`),
  jobs: () => json("GET", "/api/jobs"),
  cancel: (jobId) => json("DELETE", `/api/jobs/${enc(jobId)}`),
  history: (limit) => json("GET", `/api/history?limit=${limit}`),
  workflows: () => json("GET", "/api/workflows"),
  openWorkflow: (name) => json("GET", `/api/workflows/${enc(name)}`),
  saveWorkflow: (name, workflow) => json("PUT", `/api/workflows/${enc(name)}`, workflow),
  deleteWorkflow: (name) => json("DELETE", `/api/workflows/${enc(name)}`),
  // Raw bytes of a dropped file (workflow JSON, ComfyUI API JSON or a PNG written by SaveImage).
  importFile: (file) => request("POST", "/api/import", file),
};

// Output names may contain folders (".temp/preview.png", "portraits/cat_00001_.png").
export function outputURL(name) {
  return "/api/outputs/" + name.split("/").map(enc).join("/");
}
