"""The route that serves files stored with chats (`storage.files.LocalFileStorage`): to the thread's
owner only, always as a download, never as a page."""

from __future__ import annotations

from babl_core.storage.data_layer import BablDataLayer
from babl_core.storage.files import FILES_ROUTE, LocalFileStorage
from babl_core.web.render import DOWNLOAD_MIME


def register_file_route(app) -> None:
    """Serve `LocalFileStorage` files at `FILES_ROUTE/<key>` on Chainlit's FastAPI app.

    Only the thread's owner gets a file (anyone else: 404, the same as a missing file). Files are
    always attachments of type application/octet-stream with `nosniff` and a sandbox CSP, so nothing
    stored (a generated page above all) runs on the app's origin, whatever its name or content.
    Added ahead of Chainlit's GET catch-all; a second call adds nothing.
    """
    if getattr(app.state, "babl_files_registered", False):
        return
    from chainlit.auth import get_current_user
    from chainlit.data import get_data_layer
    from fastapi import APIRouter, Depends, HTTPException
    from fastapi.responses import FileResponse

    router = APIRouter()

    # No return annotation: with postponed annotations it is a forward reference to this function's
    # import, which the OpenAPI schema cannot resolve (GET /openapi.json answered 500).
    @router.get(FILES_ROUTE + "/{object_key:path}", response_class=FileResponse)
    async def stored_file(object_key: str, current_user=Depends(get_current_user)):
        if current_user is None:
            raise HTTPException(status_code=401, detail="Log in to download stored files")
        layer = get_data_layer()
        if not isinstance(layer, BablDataLayer) or not isinstance(layer.storage_provider, LocalFileStorage):
            raise HTTPException(status_code=404, detail="Not found")
        try:
            path = layer.storage_provider.path_for(object_key)
        except ValueError:
            raise HTTPException(status_code=404, detail="Not found") from None
        owner = await layer.thread_owner(object_key.split("/", 1)[0])
        if owner is None or owner != current_user.identifier or not path.is_file():
            raise HTTPException(status_code=404, detail="Not found")
        return FileResponse(
            path,
            media_type=DOWNLOAD_MIME,
            filename=path.name,
            content_disposition_type="attachment",
            headers={
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; sandbox",
                "Cache-Control": "private, no-store",
            },
        )

    app.router.routes[0:0] = router.routes
    app.state.babl_files_registered = True
