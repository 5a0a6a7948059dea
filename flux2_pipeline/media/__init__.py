"""Images of completed edits: download, verify, store by content, list in a manifest.

Dagster-free. `sync_images` fetches every image a results table points at into an
`ImageStore` (content-addressed, atomic writes) through `flux2_pipeline.net`'s guarded
fetcher (address policy, per-attempt deadline, size cap, retries), with bounded
concurrency, structure checks that decode as little as the format allows, a decode
budget counted in pixels and a decode ceiling above which nothing is decoded, and streams the
manifest (one row per image) as it goes, in memory that does not grow with the partition;
`render_contact_sheet` draws a partition's references beside their edits.

Example::

    store = ImageStore(Path("out/images"), base=Path("out"))
    report = sync_images_blocking(
        iter_image_refs(iter_parquet(results)), store, manifest, previous=manifest,
        policy=AddressPolicy.for_api(base_url),
    )
    first_rows = list(islice(iter_manifest(manifest), 10))
"""

from flux2_pipeline.media.budget import PixelBudget
from flux2_pipeline.media.contact import (
    ContactRow,
    contact_rows,
    markdown_preview,
    render_contact_sheet,
    save_png,
)
from flux2_pipeline.media.download import FetchedImage, ImageFetcher
from flux2_pipeline.media.errors import (
    CorruptImage,
    ImageFetchError,
    ImageRefused,
    ImageTooLarge,
    ImageUnavailable,
    InvalidImageUrl,
    NotAnImage,
)
from flux2_pipeline.media.manifest import (
    MANIFEST_COLUMN_DESCRIPTIONS,
    MANIFEST_SCHEMA,
    ImageRecord,
    ImageRef,
    ManifestIndex,
    ManifestWriter,
    completed_rows,
    image_refs,
    iter_image_refs,
    iter_manifest,
    read_manifest,
    write_manifest,
)
from flux2_pipeline.media.store import ImageStore, StoredImage
from flux2_pipeline.media.sync import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_DECODES,
    EXPIRED,
    EXPIRED_ERROR,
    FAILURES_KEPT,
    OutputRefresh,
    SyncReport,
    sync_images,
    sync_images_blocking,
)
from flux2_pipeline.media.verify import (
    DEFAULT_MAX_PIXELS,
    ImageInfo,
    UndecodableImage,
    inspect_image,
    open_image,
)
from flux2_pipeline.net import DEFAULT_MAX_BYTES, AddressPolicy, FetchLimits

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DECODES",
    "DEFAULT_MAX_PIXELS",
    "EXPIRED",
    "EXPIRED_ERROR",
    "FAILURES_KEPT",
    "MANIFEST_COLUMN_DESCRIPTIONS",
    "MANIFEST_SCHEMA",
    "AddressPolicy",
    "ContactRow",
    "CorruptImage",
    "FetchLimits",
    "FetchedImage",
    "ImageFetchError",
    "ImageFetcher",
    "ImageInfo",
    "ImageRecord",
    "ImageRef",
    "ImageRefused",
    "ImageStore",
    "ImageTooLarge",
    "ImageUnavailable",
    "InvalidImageUrl",
    "ManifestIndex",
    "ManifestWriter",
    "NotAnImage",
    "OutputRefresh",
    "PixelBudget",
    "StoredImage",
    "SyncReport",
    "UndecodableImage",
    "completed_rows",
    "contact_rows",
    "image_refs",
    "inspect_image",
    "iter_image_refs",
    "iter_manifest",
    "markdown_preview",
    "open_image",
    "read_manifest",
    "render_contact_sheet",
    "save_png",
    "sync_images",
    "sync_images_blocking",
    "write_manifest",
]
