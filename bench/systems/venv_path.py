"""Imported first by the bench systems that use kazoo_green or orjson inside Kamailio:
the project's ``.venv`` site-packages and the project root on ``sys.path`` (Kamailio's
Python is Debian's, without the venv; app_python3 already puts this directory there)."""

import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for site in glob.glob(os.path.join(ROOT, '.venv', 'lib', 'python%d.%d' % sys.version_info[:2],
                                   'site-packages')) + [ROOT]:
    if site not in sys.path:
        sys.path.insert(0, site)
