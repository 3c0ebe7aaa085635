"""Image uploads into the input folder: stored as ComfyUI's, listed for LoadImage, refused cleanly when bad."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from PIL import Image

from nodegraph.server import api_uploads
from nodegraph.settings import Settings
from tests.server.conftest import Client, MakeClient, finished, queue, state, wf


def png(width: int = 4, height: int = 4, colour: tuple[int, ...] = (0, 0, 0, 0), mode: str = "RGBA") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def claimed_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width`×`height` pixels (what a decompression bomb looks like)."""
    data = bytearray(png(1, 1, (0,), mode="L"))
    ihdr = 12  # signature (8), then the IHDR chunk's length (4) and type (4): its width and height follow
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def form(data: bytes, filename: str = "photo.png", **fields: str) -> FormData:
    body = FormData(quote_fields=False)  # names as they are, slashes included
    body.add_field("image", data, filename=filename, content_type="image/png")
    for name, value in fields.items():
        body.add_field(name, value)
    return body


async def upload(client: Client, data: bytes, filename: str = "photo.png", **fields: str) -> tuple[int, Any]:
    response = await client.post("/api/upload/image", data=form(data, filename, **fields))
    return response.status, await response.json()


async def choices(client: Client) -> list[str]:
    catalog = await (await client.get("/api/nodes")).json()
    found: list[str] = catalog["nodes"]["LoadImage"]["inputs"][0]["choices"]
    return found


async def test_an_upload_is_stored_in_the_input_folder_and_listed_for_load_image(client: Client,
                                                                                 settings: Settings) -> None:
    data = png(colour=(255, 0, 0, 128))
    assert await upload(client, data) == (200, {"name": "photo.png", "subfolder": "", "type": "input"})
    assert (settings.input_dir / "photo.png").read_bytes() == data
    assert await upload(client, png(), "mask.png", subfolder="masks/a") == (
        200, {"name": "mask.png", "subfolder": "masks/a", "type": "input"})
    assert (settings.input_dir / "masks" / "a" / "mask.png").read_bytes() == png()
    assert await choices(client) == ["masks/a/mask.png", "photo.png"]
    assert sorted(p.name for p in settings.input_dir.iterdir()) == ["masks", "photo.png"]  # no temporary files


async def test_an_uploaded_image_runs_in_a_job(client: Client) -> None:
    await upload(client, png(6, 3, (10, 20, 30, 0)))
    job = await finished(client, await queue(client, wf({
        "1": {"type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"type": "Show", "inputs": {"value": ["1", "MASK"]}}})))
    assert job["status"] == "ok", job["errors"]
    assert job["nodes"]["1"]["outputs"]["IMAGE"]["summary"] == "1 image(s), 6×3"


async def test_a_taken_name_gets_a_number_unless_overwrite_and_the_same_bytes_are_kept_once(
        client: Client, settings: Settings) -> None:
    first, second = png(colour=(1, 2, 3, 255)), png(colour=(4, 5, 6, 255))
    assert (await upload(client, first))[1]["name"] == "photo.png"
    assert (await upload(client, second))[1]["name"] == "photo (1).png"
    assert (await upload(client, png(colour=(7, 8, 9, 255))))[1]["name"] == "photo (2).png"
    assert (await upload(client, second))[1]["name"] == "photo (1).png"  # already there: not stored twice
    assert (await upload(client, second, overwrite="true"))[1]["name"] == "photo.png"
    assert (settings.input_dir / "photo.png").read_bytes() == second
    assert sorted(p.name for p in settings.input_dir.iterdir()) == ["photo (1).png", "photo (2).png", "photo.png"]


@pytest.mark.parametrize("filename, fields, status, code", [
    ("../escape.png", {}, 400, "bad_name"),
    ("a/b.png", {}, 400, "bad_name"),
    ("a\\b.png", {}, 400, "bad_name"),
    (".hidden.png", {}, 400, "bad_name"),
    ("photo.png", {"subfolder": "../outside"}, 400, "bad_name"),
    ("photo.png", {"subfolder": "a/../../outside"}, 400, "bad_name"),
    ("photo.png", {"subfolder": "a\x00b"}, 400, "bad_name"),
    ("photo.png", {"subfolder": "/tmp"}, 400, "bad_name"),
    ("photo.png", {"subfolder": ".git"}, 400, "bad_name"),
    ("photo.png", {"subfolder": "link"}, 403, "outside_folder"),
    ("photo.png", {"type": "output"}, 400, "bad_type"),
    ("notes.txt", {}, 400, "not_an_image"),
    ("page.html", {}, 400, "not_an_image"),
])
async def test_unsafe_names_are_refused_and_leave_nothing(client: Client, settings: Settings, tmp_path: Path,
                                                          filename: str, fields: dict[str, str], status: int,
                                                          code: str) -> None:
    settings.input_dir.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", settings.input_dir / "link")
    before = await state(client, tmp_path)
    got, body = await upload(client, png(), filename, **fields)
    assert (got, body["errors"][0]["code"]) == (status, code), body
    assert await state(client, tmp_path) == before


@pytest.mark.parametrize("data, code", [
    (b"not an image at all", "not_an_image"),
    (png(64, 64, (1, 2, 3), mode="RGB")[:100], "not_an_image"),  # truncated
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not_an_image"),
    (png(16385, 1, (0,), mode="L"), "too_large"),
    (claimed_png(15_000, 15_000), "too_large"),  # 225 megapixels: past Pillow's own bomb limit
    (claimed_png(10_000, 10_000), "too_large"),  # 100 megapixels: past ours, under Pillow's
])
async def test_files_that_are_not_usable_images_are_refused(client: Client, settings: Settings, tmp_path: Path,
                                                            data: bytes, code: str) -> None:
    before = await state(client, tmp_path)
    status, body = await upload(client, data)
    assert (status, body["errors"][0]["code"]) == (400, code)
    assert "photo.png" in body["errors"][0]["message"]
    assert await state(client, tmp_path) == before


async def test_missing_file_field_too_large_body_and_cross_site_are_refused(make_client: MakeClient, tmp_path: Path,
                                                                            settings: Settings) -> None:
    client = await make_client(max_body=10_000)
    response = await client.post("/api/upload/image", data={"subfolder": "x"})
    assert (response.status, (await response.json())["errors"][0]["code"]) == (400, "missing_image")
    response = await client.post("/api/upload/image", data=b"raw bytes")
    assert response.status == 400
    response = await client.post("/api/upload/image", data=form(os.urandom(20_000)))
    assert (response.status, (await response.json())["errors"][0]["code"]) == (413, "body_too_large")
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        response = await client.post("/api/upload/image", data=form(png()), headers=headers)
        assert (response.status, (await response.json())["errors"][0]["code"]) == (403, "cross_site")
    assert not settings.input_dir.exists()


async def test_an_upload_onto_a_full_disk_is_507_naming_the_folder_not_its_path(
        client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: Path, data: bytes, overwrite: bool) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(api_uploads, "store", full)
    status, body = await upload(client, png())
    error = body["errors"][0]
    assert (status, error["code"], error["folder"]) == (507, "storage_full", "input")
    assert str(tmp_path) not in json.dumps(body)
    monkeypatch.undo()  # room again
    assert (await upload(client, png()))[0] == 200
