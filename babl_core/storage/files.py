"""Files stored with chats: elements (HTML previews, downloads, exports) under
`<data dir>/files/<thread id>/<element id>/<name>` (`LocalFileStorage`, Chainlit's storage interface),
read through `FILES_ROUTE` (served by `babl_core.web.stored_files`, to the thread's owner only).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from chainlit.data.storage_clients.base import BaseStorageClient

from babl_core import settings

log = logging.getLogger("babl.history")

FILES_ROUTE = "/babl/files"
DEFAULT_MIME = "application/octet-stream"  # an upload that names no type


def files_dir() -> Path:
    """Where stored elements live: `files/` in the data directory."""
    return settings.data_dir() / "files"


_KEY_PART = re.compile(r"^[A-Za-z0-9._@+=-]{1,200}$")


def safe_file_name(name: str) -> str:
    """An element name usable as the last part of a storage key (no separators, no dot-only names)."""
    cleaned = re.sub(r"[^A-Za-z0-9._@+=-]+", "_", name or "").strip("._") or "file"
    return cleaned[:200]


class LocalFileStorage(BaseStorageClient):
    """Chainlit's storage interface over a local folder (`data/files/` by default).

    Keys are `<thread id>/<element id>/<name>`, so a thread's files are one folder, removed with it.
    Read URLs point at `register_file_route`'s route, which checks the owner and never serves HTML.

    Args:
        root: The folder (created on first write).
        url_prefix: The route that serves the files.
    """

    def __init__(self, root: Path | None = None, url_prefix: str = FILES_ROUTE) -> None:
        self.root = Path(root) if root is not None else files_dir()
        self.url_prefix = url_prefix.rstrip("/")

    def path_for(self, object_key: str) -> Path:
        """The file for `object_key`.

        Raises:
            ValueError: the key has empty, `.`/`..` or unusual parts (it could leave the folder).
        """
        parts = object_key.split("/")
        if not parts or any(not _KEY_PART.match(part) or set(part) == {"."} for part in parts):
            raise ValueError(f"{object_key!r} is not a storage key of the form <thread>/<element>/<name>")
        return self.root.joinpath(*parts)

    def thread_dir(self, thread_id: str) -> Path:
        return self.path_for(thread_id)

    async def upload_file(
        self,
        object_key: str,
        data: bytes | str,
        mime: str = DEFAULT_MIME,
        overwrite: bool = True,
        content_disposition: str | None = None,
    ) -> dict[str, Any]:
        """Write the file (atomically: a reader never sees half of it)."""
        path = self.path_for(object_key)
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)

        def write() -> None:
            if path.exists() and not overwrite:
                raise FileExistsError(f"{object_key} exists and overwrite is False")
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
            partial.write_bytes(payload)
            os.replace(partial, path)

        await asyncio.to_thread(write)
        return {"object_key": object_key, "url": await self.get_read_url(object_key)}

    async def delete_file(self, object_key: str) -> bool:
        """Remove the file and the folders it leaves empty; False when it was not there."""
        path = self.path_for(object_key)

        def remove() -> bool:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            parent = path.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
            return True

        return await asyncio.to_thread(remove)

    async def delete_thread_files(self, thread_id: str) -> None:
        """Remove everything stored for a thread (also files whose database row was never written)."""
        folder = self.thread_dir(thread_id)
        if folder.exists():
            await asyncio.to_thread(shutil.rmtree, folder)

    async def get_read_url(self, object_key: str) -> str:
        self.path_for(object_key)  # validates
        return f"{self.url_prefix}/{object_key}"

    async def close(self) -> None:
        return None
