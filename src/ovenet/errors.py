"""User-facing errors.

Anything a user can cause (a bad file, a bad key, a bad value) raises an :class:`OvenetError` with a one-line
message naming the culprit and the fix. The CLI prints that line and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class OvenetError(Exception):
    """An error caused by user input; its message is shown as-is, without a traceback."""


class DataError(OvenetError):
    """A dataset file or layout is missing, corrupt or inconsistent."""


class ConfigError(OvenetError):
    """A config key or value is unknown, mistyped or out of range."""


class CheckpointError(OvenetError):
    """A checkpoint cannot be read or does not fit the model."""


def install_command(extra: str) -> str:
    """The pip command that installs ovenet's optional ``extra`` (e.g. ``report``) into this installation.

    ovenet is usually installed from a source checkout (``pip install -e .``): there ``pip install
    'ovenet[report]'`` would fetch a release from the package index instead of adding to the checkout, so the
    checkout's own path is named. pip records where it installed from in the distribution's direct_url.json.
    """
    import json
    from importlib.metadata import PackageNotFoundError, distribution
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    try:
        recorded = json.loads(distribution("ovenet").read_text("direct_url.json") or "{}")
    except PackageNotFoundError:  # not installed, run from a checkout through PYTHONPATH
        checkout = Path(__file__).resolve().parents[2]
        if (checkout / "pyproject.toml").is_file():
            return f'pip install -e "{checkout}[{extra}]"'
        recorded = {}
    except ValueError:
        recorded = {}
    url = urlparse(recorded.get("url", ""))
    if "dir_info" in recorded and url.scheme == "file":  # installed from a local folder (a checkout)
        editable = "-e " if recorded["dir_info"].get("editable") else ""
        return f'pip install {editable}"{unquote(url.path)}[{extra}]"'
    return f'pip install "ovenet[{extra}]"'
