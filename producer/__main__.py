import sys

from worker.settings import SettingsError

try:
    from .cli import main
except SettingsError as exc:  # a limit read when the frame contract loads (VQ_MAX_IMAGE_BYTES, VQ_MAX_PIXELS)
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

raise SystemExit(main())
