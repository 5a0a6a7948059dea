"""Images of completed edits: download, verify, store by content, list in a manifest.

Dagster-free. `sync_images` fetches every image a results table points at into an
`ImageStore` (content-addressed, atomic writes) with bounded concurrency, retries and a
size cap; `write_manifest` records one row per image; `render_contact_sheet` draws a
partition's references beside their edits.

Example::

    store = ImageStore(Path("out/images"), base=Path("out"))
    report = sync_images_blocking(image_refs(results), store, read_manifest(manifest))
    write_manifest(manifest, report.records)
"""

from flux2_pipeline.media.contact import (
    ContactRow,
    contact_rows,
    markdown_preview,
    render_contact_sheet,
    save_png,
)
from flux2_pipeline.media.errors import (
    CorruptImage,
    ImageFetchError,
    ImageTooLarge,
    ImageUnavailable,
    NotAnImage,
)
from flux2_pipeline.media.fetch import (
    DEFAULT_MAX_BYTES,
    RETRYABLE_STATUS,
    Fetched,
    FetchLimits,
    ImageFetcher,
    backoff_delay,
    is_retryable_status,
    retry_after_seconds,
)
from flux2_pipeline.media.manifest import (
    MANIFEST_COLUMN_DESCRIPTIONS,
    MANIFEST_SCHEMA,
    ImageRecord,
    ImageRef,
    image_refs,
    read_manifest,
    write_manifest,
)
from flux2_pipeline.media.store import ImageStore, StoredImage
from flux2_pipeline.media.sync import (
    DEFAULT_CONCURRENCY,
    SyncReport,
    sync_images,
    sync_images_blocking,
)
from flux2_pipeline.media.verify import ImageInfo, UndecodableImage, inspect_image

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_BYTES",
    "MANIFEST_COLUMN_DESCRIPTIONS",
    "MANIFEST_SCHEMA",
    "RETRYABLE_STATUS",
    "ContactRow",
    "CorruptImage",
    "FetchLimits",
    "Fetched",
    "ImageFetchError",
    "ImageFetcher",
    "ImageInfo",
    "ImageRecord",
    "ImageRef",
    "ImageStore",
    "ImageTooLarge",
    "ImageUnavailable",
    "NotAnImage",
    "StoredImage",
    "SyncReport",
    "UndecodableImage",
    "backoff_delay",
    "contact_rows",
    "image_refs",
    "inspect_image",
    "is_retryable_status",
    "markdown_preview",
    "read_manifest",
    "render_contact_sheet",
    "retry_after_seconds",
    "save_png",
    "sync_images",
    "sync_images_blocking",
    "write_manifest",
]
