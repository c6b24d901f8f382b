"""Started by conftest through PYTHONPATH in the CLI processes of the test suite: logs
every control reply they receive (see replyrecord)."""
import os

if os.environ.get("FRAMEBROKER_REPLY_LOG"):
    import replyrecord

    replyrecord.install_on_import()
