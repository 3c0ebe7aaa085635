// The server's HTTP API, as small async functions. Every request stays on this page's origin.
// Every failure (server down, a 4xx with its errors, a 5xx) reaches `failures.report`, which the
// editor shows in its status line; callers that show a 4xx's errors themselves say so.

export const failures = { report: (_message) => {} };

// `body` is sent as JSON, as it is when it is a Blob (a dropped file), or as a multipart form.
async function request(method, path, body, { quiet4xx = false } = {}) {
  const init = { method, headers: {} };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body instanceof Blob) {
    init.body = body;
    init.headers["Content-Type"] = body.type || "application/octet-stream";
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response, text;
  try {
    response = await fetch(path, init);
    text = await response.text();
  } catch {
    const message = `${method} ${path.split("?")[0]}: the server is not reachable`;
    failures.report(message);
    throw new ApiError(message, 0, []);
  }
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { errors: [{ node_id: null, input: null, code: "http", message: text.slice(0, 200) }] };
  }
  const { ok, status } = response;
  if (!ok && (status >= 500 || !quiet4xx)) failures.report(`${method} ${path.split("?")[0]}: ${describe(status, data)}`);
  return { ok, status, data };
}

function describe(status, data) {
  return data?.errors?.map((e) => e.message).join("; ") || data?.error || `HTTP ${status}`;
}

async function json(method, path, body) {
  const { ok, status, data } = await request(method, path, body);
  if (!ok) throw new ApiError(describe(status, data), status, data?.errors || []);
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
  queue: (workflow, clientId) => request("POST", "/api/jobs", { workflow, client_id: clientId }, { quiet4xx: true }),
  job: (jobId) => json("GET", `/api/jobs/${enc(jobId)}`),
  jobs: () => json("GET", "/api/jobs"),
  cancel: (jobId) => json("DELETE", `/api/jobs/${enc(jobId)}`),
  history: (limit) => json("GET", `/api/history?limit=${limit}`),
  workflows: () => json("GET", "/api/workflows"),
  // Workflow names may contain folders ("comfyui/txt2img_lora.json").
  openWorkflow: (name) => json("GET", workflowURL(name)),
  saveWorkflow: (name, workflow) => json("PUT", workflowURL(name), workflow),
  deleteWorkflow: (name) => json("DELETE", workflowURL(name)),
  // Raw bytes of a dropped file (workflow JSON, ComfyUI API JSON or a PNG written by SaveImage).
  importFile: (file) => request("POST", "/api/import", file, { quiet4xx: true }),
  // LoadImage's upload button: a multipart form with the image → {name, subfolder, type}.
  upload: (form) => json("POST", "/api/upload/image", form),
};

function workflowURL(name) {
  return "/api/workflows/" + name.split("/").map(enc).join("/");
}

// Output names may contain folders (".temp/preview.png", "portraits/cat_00001_.png").
export function outputURL(name) {
  return "/api/outputs/" + name.split("/").map(enc).join("/");
}
