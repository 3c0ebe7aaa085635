// Drawing what a run shows on the canvas: a coloured outline per node state, Sample's progress
// bar, the images of SaveImage/PreviewImage nodes, and errors on the node and input they name.
/* global LiteGraph */

export const STATE_COLORS = {
  queued: "#8d8d5a", running: "#4caf50", ran: "#26a69a", cached: "#5c7cfa",
  error: "#ef5350", interrupted: "#ffa726",
};
const IMAGE_AREA = 200;

export function imageAreaHeight(node) {
  return node.ngRun?.images?.length ? IMAGE_AREA : 0;
}

// Inside the node (litegraph calls this with the node's origin at its top-left body corner).
export function drawImages(node, ctx) {
  const images = node.ngRun?.images;
  if (!images?.length || node.flags.collapsed) return;
  const top = node.size[1] - IMAGE_AREA + 4;
  const width = node.size[0] - 16;
  const height = IMAGE_AREA - 8;
  const cols = Math.ceil(Math.sqrt(images.length));
  const rows = Math.ceil(images.length / cols);
  const cellW = width / cols, cellH = height / rows;
  ctx.save();
  ctx.imageSmoothingEnabled = false; // small images stay crisp
  images.forEach((image, i) => {
    if (!image.complete || !image.naturalWidth) return;
    const scale = Math.min((cellW - 4) / image.naturalWidth, (cellH - 4) / image.naturalHeight);
    const w = image.naturalWidth * scale, h = image.naturalHeight * scale;
    const x = 8 + (i % cols) * cellW + (cellW - w) / 2;
    const y = top + Math.floor(i / cols) * cellH + (cellH - h) / 2;
    ctx.drawImage(image, x, y, w, h);
  });
  ctx.restore();
}

// Over the whole graph, after the nodes (graph coordinates): outlines, badges, progress, errors.
export function drawRunOverlay(graph, ctx) {
  const titleHeight = LiteGraph.NODE_TITLE_HEIGHT;
  for (const node of graph._nodes) {
    if (MODE_SHADES[node.mode]) drawMode(ctx, node, MODE_SHADES[node.mode]);
    const run = node.ngRun;
    if (!run || (!run.status && !run.errors?.length)) continue;
    const [x, y] = node.pos;
    const w = node.flags.collapsed ? (node._collapsed_width || LiteGraph.NODE_COLLAPSED_WIDTH) : node.size[0];
    const h = node.flags.collapsed ? 0 : node.size[1];
    const color = STATE_COLORS[run.errors?.length ? "error" : run.status] || "#888";
    ctx.save();
    ctx.lineWidth = 3;
    ctx.strokeStyle = color;
    ctx.beginPath();
    ctx.roundRect(x - 4, y - titleHeight - 4, w + 8, h + titleHeight + 8, 8);
    ctx.stroke();
    ctx.font = "12px sans-serif";
    ctx.textAlign = "right";
    ctx.fillStyle = color;
    ctx.fillText(fit(ctx, badge(run), Math.max(w, 80)), x + w, y - titleHeight - 8);
    ctx.textAlign = "left";
    if (!node.flags.collapsed) {
      if (run.status === "running" && run.progress) drawProgress(ctx, node, run.progress);
      if (run.errors?.length) drawErrors(ctx, node, run.errors);
      if (run.text) drawText(ctx, node, run.text);
    }
    ctx.restore();
  }
}

// Bypassed (purple) and muted (grey) nodes are shaded over, with their mode as a badge.
const MODE_SHADES = { 2: ["rgba(40, 40, 40, 0.6)", "muted"], 4: ["rgba(120, 60, 160, 0.45)", "bypassed"] };

function drawMode(ctx, node, [shade, label]) {
  const titleHeight = LiteGraph.NODE_TITLE_HEIGHT;
  const [x, y] = node.pos;
  const w = node.flags.collapsed ? (node._collapsed_width || LiteGraph.NODE_COLLAPSED_WIDTH) : node.size[0];
  const h = node.flags.collapsed ? 0 : node.size[1];
  ctx.save();
  ctx.fillStyle = shade;
  ctx.beginPath();
  ctx.roundRect(x, y - titleHeight, w, h + titleHeight, 8);
  ctx.fill();
  ctx.font = "12px sans-serif";
  ctx.fillStyle = "#e1bee7";
  ctx.fillText(label, x + 4, y - titleHeight - 8);
  ctx.restore();
}

function badge(run) {
  if (run.errors?.length) return "error";
  const seconds = run.seconds != null ? ` ${run.seconds.toFixed(2)} s` : "";
  if (run.status === "running" && run.progress) return `running ${run.progress.step}/${run.progress.total}`;
  return `${run.status}${run.status === "ran" ? seconds : ""}${run.info ? ` · ${run.info}` : ""}`;
}

function fit(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  while (text.length > 1 && ctx.measureText(text + "…").width > width) text = text.slice(0, -1);
  return text + "…";
}

function drawProgress(ctx, node, { step, total }) {
  const [x, y] = node.pos;
  const fraction = total ? Math.min(1, step / total) : 0;
  ctx.fillStyle = "#1b3320";
  ctx.fillRect(x, y + node.size[1] - 6, node.size[0], 6);
  ctx.fillStyle = STATE_COLORS.running;
  ctx.fillRect(x, y + node.size[1] - 6, node.size[0] * fraction, 6);
}

function drawErrors(ctx, node, errors) {
  const [x, y] = node.pos;
  for (const error of errors) {
    if (!error.input) continue;
    const widget = node.widgets?.find((w) => w.name === error.input);
    const slot = node.findInputSlot(error.input);
    ctx.strokeStyle = STATE_COLORS.error;
    ctx.lineWidth = 2;
    ctx.beginPath();
    if (widget && widget.last_y !== undefined) {
      ctx.roundRect(x + 12, y + widget.last_y - 2, node.size[0] - 24, LiteGraph.NODE_WIDGET_HEIGHT + 4, 8);
    } else if (slot >= 0) {
      const [sx, sy] = node.getConnectionPos(true, slot);
      ctx.arc(sx, sy, 8, 0, Math.PI * 2);
    }
    ctx.stroke();
  }
  const lines = errors.flatMap((e) => {
    const wrapped = wrap(ctx, (e.input ? `${e.input}: ` : "") + e.message, Math.max(node.size[0], 260) - 16);
    return wrapped.length > 3 ? [...wrapped.slice(0, 2), `${wrapped[2]} …`] : wrapped; // the panel has it all
  });
  const boxHeight = lines.length * 16 + 10;
  const top = y + node.size[1] + 10;
  ctx.fillStyle = "rgba(80, 20, 20, 0.92)";
  ctx.beginPath();
  ctx.roundRect(x, top, Math.max(node.size[0], 260), boxHeight, 6);
  ctx.fill();
  ctx.fillStyle = "#ffcdd2";
  ctx.font = "12px sans-serif";
  lines.forEach((line, i) => ctx.fillText(line, x + 8, top + 18 + i * 16));
}

function drawText(ctx, node, text) {
  const [x, y] = node.pos;
  ctx.fillStyle = "#cfd8dc";
  ctx.font = "12px monospace";
  wrap(ctx, text, Math.max(node.size[0], 200) - 8).slice(0, 6)
    .forEach((line, i) => ctx.fillText(line, x + 4, y + node.size[1] + 18 + i * 15));
}

function wrap(ctx, text, width) {
  ctx.font = "12px sans-serif";
  const lines = [];
  let line = "";
  for (const word of String(text).split(/\s+/)) {
    const next = line ? `${line} ${word}` : word;
    if (ctx.measureText(next).width > width && line) {
      lines.push(line);
      line = word;
    } else {
      line = next;
    }
  }
  if (line) lines.push(line);
  return lines;
}
