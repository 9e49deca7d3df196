"""`lfr certs dev`: development TLS certificates and a development identity provider.

Creates (or refreshes) DIR/tls: a local CA (ca.pem, ca.key) and <name>.pem / <name>.key for the six
services, nats and client (a generic client certificate for the CLI and tests), each for both TLS server and
client use; and DIR/idp: the development identity provider (signing keys, keys/ with the public keys the
services verify tokens against, users.json). Files still valid are kept. For development only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def default_out() -> Path:
    from lfr.runtime.paths import state_dir

    return state_dir() / "security"


def certs_dev(args: argparse.Namespace) -> None:
    from lfr.runtime.devidp import DevIdP, setup_security_dir
    from lfr.runtime.embedded import SERVICES

    hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *(args.host or [])]))
    paths = setup_security_dir(args.out or default_out(), SERVICES, hosts=hosts, days=args.days)
    users = DevIdP(paths["idp_dir"]).users()
    print(f"TLS (CA, {', '.join(SERVICES)}, nats, client): {paths['tls_dir']}")
    print(f"  new certificates name DNS:<name>, {', '.join(hosts)}; valid {args.days} days (valid files are kept)")
    print(f"identity provider: {paths['idp_dir']}")
    print("  users: " + ", ".join(f"{user} ({' '.join(roles)})" for user, roles in users.items()))
    print("set for the services:")
    print(f"  export LFR_TLS_DIR={paths['tls_dir']}")
    print(f"  export LFR_AUTH_KEYS_DIR={paths['auth_keys_dir']}")


def add_parsers(sub) -> None:
    c = sub.add_parser("certs", help="development TLS certificates and identity provider: dev")
    csub = c.add_subparsers(dest="certs", required=True)
    p = csub.add_parser("dev", help="create or refresh a development CA, certificates and identity provider",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", metavar="DIR",
                   help="output folder (default: ./state/security, or $LFR_STATE_DIR/security when set)")
    p.add_argument("--host", action="append", metavar="H",
                   help="another host name or IP address for every certificate (repeatable; DNS:<name>, "
                        "localhost and 127.0.0.1 are always included)")
    p.add_argument("--days", type=int, default=30, help="certificate validity in days (default 30)")
    p.set_defaults(func=certs_dev)
