"""``python -m partc.cli``: the ``partc`` command (``partc.runtime.deploy`` starts workers this way)."""

from partc.cli import entry

if __name__ == "__main__":
    entry()
