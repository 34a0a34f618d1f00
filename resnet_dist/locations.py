"""What a location string names, checked before any work: a local path, file://, http(s)://, or an fsspec URL.

Kept apart from storage.py so the CLIs can refuse a bad `--data`/`--out` in their first milliseconds without
importing an HTTP client or fsspec.
"""

from __future__ import annotations

import importlib.util
import re
import urllib.parse

from resnet_dist.errors import UsageError

# scheme -> (fsspec protocol, module that provides it, the extra that installs it)
FSSPEC_SCHEMES = {
    "s3": ("s3", "s3fs", "s3"),
    "gs": ("gs", "gcsfs", "gcs"),
    "gcs": ("gcs", "gcsfs", "gcs"),
    "az": ("az", "adlfs", "azure"),
    "abfs": ("abfs", "adlfs", "azure"),
    "hf": ("hf", "huggingface_hub", "hf"),
}
SUPPORTED = "a local path, file://, http://, https://, s3://, gs://, gcs://, az://, abfs://, hf://"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# "s3:/bucket/x": a URL whose '//' a shell, a Path() or a join turned into one slash. Two letters at least,
# so a Windows drive ("C:/data") is not taken for one.
_ONE_SLASH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")
# "s3:bucket/x": a scheme we serve, with its slashes lost altogether.
_NO_SLASH = re.compile(r"^(s3|gs|gcs|az|abfs|hf|https?|file):(?!//)", re.IGNORECASE)


def scheme_of(base: str) -> str | None:
    """The lower-case scheme of `base` ("s3", "http", "file"), or None for a plain path."""
    match = _SCHEME.match(str(base))
    return match.group(1).lower() if match else None


def local_path(base: str) -> str:
    """The file-system path of a plain path or a file:// URL."""
    if scheme_of(base) == "file":
        return urllib.parse.unquote(urllib.parse.urlsplit(str(base)).path)
    return str(base)


def _no_credentials(base: str, flag: str, scheme: str) -> None:
    # user:secret@host would put the secret into config.json, logs and W&B with the URL; the message must
    # not repeat it either, so it names only the scheme and the host.
    netloc = urllib.parse.urlsplit(base).netloc
    if "@" in netloc:
        host = netloc.rsplit("@", 1)[1]
        raise UsageError(
            f"{flag} {scheme}://...@{host}/...: a URL must not carry credentials; "
            "give them the store's standard way (environment, credentials file; see docs/storage.md)"
        )


def backend_missing(scheme: str) -> str | None:
    """The install hint if the fsspec backend for `scheme` is not importable, else None."""
    _, module, extra = FSSPEC_SCHEMES[scheme]
    if importlib.util.find_spec("fsspec") is None or importlib.util.find_spec(module) is None:
        return f"{scheme}:// needs {module}: pip install 'resnet-dist[{extra}]'"
    return None


def check_location(base: str, flag: str = "location") -> str:
    """`base` if it names a place resnet-dist can read or write, else one UsageError line naming `flag`."""
    base = str(base)
    scheme = scheme_of(base)
    if scheme is None:
        one = _ONE_SLASH.match(base) or _NO_SLASH.match(base)
        if one:
            name = one.group(1)
            raise UsageError(
                f"{flag} {base}: looks like a URL with a slash missing after '{name}:'; write {name}://... "
                f"(or ./{base} for a local folder of that name)"
            )
        return base
    if scheme == "file":
        if urllib.parse.urlsplit(base).netloc not in ("", "localhost"):
            raise UsageError(f"{flag} {base}: file:// takes no host (file:///absolute/path)")
        return base
    _no_credentials(base, flag, scheme)
    if scheme in ("http", "https"):
        return base
    if scheme not in FSSPEC_SCHEMES:
        raise UsageError(f"{flag} {base}: unsupported scheme '{scheme}://' (supported: {SUPPORTED})")
    if not base.split("://", 1)[1].strip("/"):
        raise UsageError(f"{flag} {base}: names no bucket or repository")
    missing = backend_missing(scheme)
    if missing:
        raise UsageError(f"{flag} {base}: {missing}")
    return base
