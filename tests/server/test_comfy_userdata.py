"""ComfyUI's frontend support routes: users, settings, user files, and the start-up lists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodegraph.server.state import ServerConfig
from tests.server.conftest import Client, MakeClient


async def test_single_user_mode_is_migrated_once_the_user_folder_exists(client: Client) -> None:
    assert await (await client.get("/api/users")).json() == {"storage": "server", "migrated": False}
    assert (await client.post("/api/settings", json={"Comfy.Locale": "en"})).status == 200
    assert await (await client.get("/users")).json() == {"storage": "server", "migrated": True}
    refused = await client.post("/api/users", json={"username": "bob"})
    assert refused.status == 400 and (await refused.json())["errors"][0]["code"] == "single_user"


async def test_settings_and_files_persist_across_a_restart(make_client: MakeClient, config: ServerConfig) -> None:
    first = await make_client()
    assert (await first.post("/api/settings", json={"a": 1, "b": {"c": [2]}})).status == 200
    assert (await first.post("/api/settings/d", json="x")).status == 200
    assert (await first.post("/api/settings", json={"a": 3})).status == 200
    saved = await first.post("/api/userdata/workflows%2Fmy%20flow.json", data=b'{"nodes": []}')
    assert saved.status == 200 and await saved.json() == "workflows/my flow.json"
    await first.close()

    second = await make_client()
    assert await (await second.get("/api/settings")).json() == {"a": 3, "b": {"c": [2]}, "d": "x"}
    assert await (await second.get("/settings/b")).json() == {"c": [2]}
    assert await (await second.get("/settings/unset")).json() is None
    got = await second.get("/api/userdata/workflows%2Fmy%20flow.json")
    assert got.status == 200 and await got.read() == b'{"nodes": []}'
    assert got.headers["Content-Disposition"] == "attachment"
    assert (config.data_dir / "user" / "default" / "workflows" / "my flow.json").is_file()
    assert (config.data_dir / "user" / "default" / "comfy.settings.json").is_file()


async def test_settings_bodies_are_checked(client: Client) -> None:
    for body in (b"[1]", b"{not json"):
        answer = await client.post("/api/settings", data=body, headers={"Content-Type": "application/json"})
        assert answer.status == 400, await answer.text()
        assert (await answer.json())["errors"][0]["message"]


async def test_userdata_lists_in_comfyuis_shapes(client: Client) -> None:
    for name in ("workflows%2Fa.json", "workflows%2Fsub%2Fb.json", "workflows%2F.hidden.json"):
        assert (await client.post(f"/api/userdata/{name}", data=b"{}")).status == 200
    listed = await client.get("/api/userdata", params={"dir": "workflows"})
    assert await listed.json() == ["a.json"]
    deep = await client.get("/api/userdata", params={"dir": "workflows", "recurse": "true", "split": "true"})
    assert await deep.json() == [["a.json", "a.json"], ["sub/b.json", "sub", "b.json"]]
    info = await (await client.get("/api/userdata", params={"dir": "workflows", "full_info": "true"})).json()
    assert [(i["path"], i["size"]) for i in info] == [("a.json", 2)]
    assert isinstance(info[0]["modified"], int) and isinstance(info[0]["created"], int)
    v2 = await (await client.get("/api/v2/userdata", params={"path": "workflows"})).json()
    assert [(e["name"], e["path"], e["type"]) for e in v2] == [
        ("sub", "workflows/sub", "directory"), ("a.json", "workflows/a.json", "file"),
        ("b.json", "workflows/sub/b.json", "file")]
    assert await (await client.get("/api/userdata", params={"dir": "nowhere"})).json() == []  # not yet made
    assert (await client.get("/api/userdata", params={"dir": "workflows/a.json"})).status == 400
    assert (await client.get("/api/userdata")).status == 400
    assert (await client.get("/api/v2/userdata", params={"path": "workflows/a.json"})).status == 400
    assert (await client.get("/api/v2/userdata", params={"path": "nowhere"})).status == 404


async def test_an_empty_user_folder_lists_nothing(client: Client) -> None:
    assert await (await client.get("/api/v2/userdata")).json() == []


async def test_overwrite_full_info_move_and_delete(client: Client, config: ServerConfig) -> None:
    assert (await client.post("/api/userdata/a.json", data=b"1")).status == 200
    kept = await client.post("/api/userdata/a.json?overwrite=false", data=b"2")
    assert kept.status == 409 and (await kept.json())["errors"][0]["code"] == "file_exists"
    info = await (await client.post("/api/userdata/a.json?full_info=true", data=b"22")).json()
    assert info["path"] == "a.json" and info["size"] == 2
    assert (await client.post("/api/userdata/b.json", data=b"3")).status == 200
    assert (await client.post("/api/userdata/a.json/move/b.json?overwrite=false")).status == 409
    moved = await client.post("/api/userdata/a.json/move/w%2Fc.json")
    assert moved.status == 200 and await moved.json() == "w/c.json"
    assert await (await client.get("/api/userdata/w%2Fc.json")).read() == b"22"
    assert (await client.get("/api/userdata/a.json")).status == 404
    assert (await client.delete("/api/userdata/w%2Fc.json")).status == 204
    assert (await client.delete("/api/userdata/w%2Fc.json")).status == 404
    assert (await client.post("/api/userdata/b.json%2Finside.json", data=b"x")).status == 409
    assert (await client.post("/api/userdata/w", data=b"x")).status == 409  # a folder


async def test_the_users_stylesheet_is_served_inline(client: Client) -> None:
    assert (await client.post("/api/userdata/user.css", data=b"body{}")).status == 200
    css = await client.get("/api/userdata/user.css")
    assert css.headers["Content-Type"].startswith("text/css") and css.headers["Content-Disposition"] == "inline"
    assert (await client.post("/api/userdata/page.html", data=b"<script>")).status == 200
    page = await client.get("/api/userdata/page.html")
    assert page.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize("name, status", [
    ("..%2Fsecret.json", 400), ("a%2F..%2F..%2Fsecret.json", 400), ("%2Fetc%2Fpasswd", 400), ("a%00.json", 400),
    ("a%5C..%5Cb.json", 400), ("link.json", 403), ("out%2Fx.json", 403)])
async def test_userdata_refuses_names_that_lead_out(client: Client, config: ServerConfig, tmp_path: Path,
                                                    name: str, status: int) -> None:
    root = config.data_dir / "user" / "default"
    root.mkdir(parents=True)
    (tmp_path / "secret.json").write_text("secret")
    os.symlink(tmp_path / "secret.json", root / "link.json")
    os.symlink(tmp_path, root / "out")
    for method, path in (("GET", f"/api/userdata/{name}"), ("POST", f"/api/userdata/{name}"),
                         ("DELETE", f"/userdata/{name}"), ("POST", f"/api/userdata/{name}/move/x.json"),
                         ("POST", f"/api/userdata/x.json/move/{name}")):
        if "x.json/move" in path:
            assert (await client.post("/api/userdata/x.json", data=b"{}")).status == 200
        answer = await client.request(method, path, data=b"{}")
        assert answer.status == status, (method, path, await answer.text())
        assert (await answer.json())["errors"][0]["message"]
    assert (tmp_path / "secret.json").read_text() == "secret"
    for query in ({"dir": name.replace("%2F", "/").replace("%00", "\0").replace("%5C", "\\")},):
        listed = await client.get("/api/userdata", params=query)
        assert 400 <= listed.status < 500
    listed = await (await client.get("/api/v2/userdata")).json()
    assert [e["name"] for e in listed] == ["x.json"]  # what leads out is not listed


async def test_the_start_up_lists(client: Client) -> None:
    for path, expected in (("/api/extensions", []), ("/api/i18n", {}), ("/api/workflow_templates", {}),
                           ("/extensions", []), ("/api/global_subgraphs", {})):
        answer = await client.get(path)
        assert answer.status == 200 and await answer.json() == expected
