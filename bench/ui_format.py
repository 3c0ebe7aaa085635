"""What converting ComfyUI's UI format costs: a 500-node UI-format workflow to our graph, and back.

    python bench/ui_format.py [--nodes 500] [--rounds 20] [--json]

The workflow is ComfyUI's default graph repeated (checkpoint, two prompts, latent, KSampler with its seed
control, VAEDecode, SaveImage), with a Reroute and a PrimitiveNode in every copy, so widgets, links, reroutes
and primitives are all converted. Prints the median time of `to_graph` (read: the target is ≤ 50 ms) and of
`to_ui` + `to_api` (what SaveImage embeds), and the ratio of each to the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from nodegraph.comfy_ui_format import to_api, to_graph, to_ui
from nodegraph.registry import load_registry

TARGET_S = 0.050
COPY = 9  # nodes per copy of the default graph


def ui_workflow(nodes: int) -> dict[str, Any]:
    """`nodes` or a few more nodes: ComfyUI's default graph, each copy with a Reroute and a Primitive seed."""
    found: list[dict[str, Any]] = []
    links: list[list[Any]] = []

    def link(origin: int, slot: int, target: int, target_slot: int, kind: str) -> int:
        links.append([len(links) + 1, origin, slot, target, target_slot, kind])
        return len(links)

    def add(node_id: int, kind: str, widgets: list[Any], inputs: list[tuple[str, int, bool]]) -> None:
        found.append({"id": node_id, "type": kind, "pos": [node_id * 10, 0], "size": [315, 100], "mode": 0,
                      "inputs": [{"name": n, "type": "*", "link": k, **({"widget": {"name": n}} if w else {})}
                                 for n, k, w in inputs], "outputs": [], "widgets_values": widgets})

    for copy in range(max(1, -(-nodes // COPY))):  # at least `nodes`
        b = copy * COPY
        ckpt, pos, neg, latent, sampler, decode, save, reroute, seed = range(b + 1, b + COPY + 1)
        add(ckpt, "CheckpointLoaderSimple", ["tiny-sd15.safetensors"], [])
        add(pos, "CLIPTextEncode", [f"a prompt number {copy}"], [("clip", link(ckpt, 1, pos, 0, "CLIP"), False)])
        add(neg, "CLIPTextEncode", ["text, watermark"], [("clip", link(ckpt, 1, neg, 0, "CLIP"), False)])
        add(latent, "EmptyLatentImage", [64, 64, 1], [])
        add(seed, "PrimitiveNode", [copy, "increment"], [])
        add(sampler, "KSampler", [0, "randomize", 4, 8, "euler", "normal", 1],
            [("model", link(ckpt, 0, sampler, 0, "MODEL"), False), ("positive", link(pos, 0, sampler, 1, "C"), False),
             ("negative", link(neg, 0, sampler, 2, "C"), False),
             ("latent_image", link(latent, 0, sampler, 3, "L"), False),
             ("seed", link(seed, 0, sampler, 4, "INT"), True)])
        add(reroute, "Reroute", [], [("", link(ckpt, 2, reroute, 0, "VAE"), False)])
        add(decode, "VAEDecode", [], [("samples", link(sampler, 0, decode, 0, "LATENT"), False),
                                      ("vae", link(reroute, 0, decode, 1, "VAE"), False)])
        add(save, "SaveImage", ["ComfyUI"], [("images", link(decode, 0, save, 0, "IMAGE"), False)])
    return {"last_node_id": len(found), "last_link_id": len(links), "nodes": found, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def median_time(work: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    lookup = load_registry().get
    flow = json.loads(json.dumps(ui_workflow(args.nodes)))  # as read from a file
    graph = to_graph(flow, lookup)
    read = median_time(lambda: to_graph(flow, lookup), args.rounds)
    write = median_time(lambda: (to_ui(graph, lookup), to_api(graph, lookup)), args.rounds)
    result = {"nodes": len(flow["nodes"]), "graph_nodes": len(graph["nodes"]), "to_graph_ms": read * 1000,
              "to_ui_and_api_ms": write * 1000, "target_ms": TARGET_S * 1000,
              "to_graph_ratio_to_target": read / TARGET_S, "to_ui_and_api_ratio_to_target": write / TARGET_S}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['nodes']} UI-format nodes ({result['graph_nodes']} after Reroutes and Primitives)")
    print(f"  to_graph          {read * 1000:7.2f} ms  ({read / TARGET_S:.2f}× the {TARGET_S * 1000:.0f} ms target)")
    print(f"  to_ui + to_api    {write * 1000:7.2f} ms  ({write / TARGET_S:.2f}× the target)")


if __name__ == "__main__":
    main()
