"""DVC stage: AVSpeech-format CSV -> exact segment clips (data/clips/) + data/manifests/download.csv."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pandas as pd  # noqa: E402

from speech2face.download import DEFAULT_FORMAT, read_cookies, run_download  # noqa: E402
from speech2face.params import ParamsError, check, get_bool, get_float, get_int, get_str, load_section  # noqa: E402

SECTION = "download"
URL_SCHEMES = ("http://", "https://", "file://")


def run(csv_path: str | Path, out_dir: str | Path, manifest_path: str | Path, url_template: str,
        root: str | Path, allow_file_urls: bool, limit: int | None, workers: int, retries: int,
        backoff_seconds: float, timeout_seconds: float, min_seconds: float,
        format_selector: str = DEFAULT_FORMAT, cookies: str | Path | None = None,
        sleep_seconds: float = 0.0) -> pd.DataFrame:
    """Download every row's segment; returns the manifest (also written to ``manifest_path``)."""
    return run_download(csv_path, out_dir, manifest_path, url_template, root, allow_file_urls, limit,
                        workers, retries, backoff_seconds, timeout_seconds, min_seconds, format_selector,
                        cookies=cookies, sleep_seconds=sleep_seconds)


def _cookies(p: dict) -> str | None:
    """``cookies``: null, or a readable Netscape cookies.txt with at least one cookie."""
    value = p.get("cookies")
    if value is None:
        return None
    check(isinstance(value, str) and value != "", SECTION, "cookies", value, "null or the path of a cookies.txt file")
    path = Path(value).expanduser()
    check(path.is_file(), SECTION, "cookies", value, "null or an existing cookies.txt file")
    try:
        read_cookies(path)
    except ValueError as error:
        check(False, SECTION, "cookies", value, f"a Netscape cookies.txt file ({error})")
    return str(path)


def read_params(p: dict) -> dict:
    """The ``download`` section checked; any bad value raises ParamsError (one line)."""
    csv_path = get_str(p, SECTION, "csv")
    check(Path(csv_path).is_file(), SECTION, "csv", csv_path, "an existing CSV file")
    template = get_str(p, SECTION, "url_template")
    check("{id}" in template and template.lower().startswith(URL_SCHEMES), SECTION, "url_template",
          template, "a URL with {id} starting with http://, https:// or file://")
    return {
        "csv_path": csv_path,
        "url_template": template,
        "allow_file_urls": get_bool(p, SECTION, "allow_file_urls"),
        "limit": get_int(p, SECTION, "limit", minimum=1, allow_none=True),
        "workers": get_int(p, SECTION, "workers", minimum=1),
        "retries": get_int(p, SECTION, "retries", minimum=0),
        "backoff_seconds": get_float(p, SECTION, "backoff_seconds", minimum=0.0, maximum=600.0),
        "timeout_seconds": get_float(p, SECTION, "timeout_seconds", minimum=0.1),
        "min_seconds": get_float(p, SECTION, "min_seconds", minimum=0.0),
        "format_selector": get_str(p, SECTION, "format") if "format" in p else DEFAULT_FORMAT,
        # both optional: a params.yaml without them downloads as before (no cookies, no pause)
        "cookies": _cookies(p),
        "sleep_seconds": (get_float(p, SECTION, "sleep_seconds", minimum=0.0, maximum=600.0)
                          if "sleep_seconds" in p else 0.0),
    }


def main() -> pd.DataFrame:
    params = read_params(load_section(SECTION))
    # DVC runs stages from the project root, so {root} is the working directory.
    return run(out_dir=Path("data/clips"), manifest_path=Path("data/manifests/download.csv"),
               root=Path.cwd(), **params)


if __name__ == "__main__":
    try:
        main()
    except ParamsError as error:
        sys.exit(f"download: {error}")
    except KeyboardInterrupt:
        print("download: interrupted; run again to resume (finished clips are kept)", file=sys.stderr)
        sys.exit(130)
