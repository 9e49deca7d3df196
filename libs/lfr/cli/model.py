"""``lfr model add|list|check``: engines a force plugs in by manifest (see docs/engines.md).

Engines are installed in ``$LFR_ENGINES_DIR``, else ``<state dir>/engines`` (``$LFR_STATE_DIR`` or ``./state``):
the same folder the embedding and watchlist services of that state folder read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _engines_dir(args) -> None:
    if getattr(args, "engines_dir", None):
        os.environ["LFR_ENGINES_DIR"] = str(args.engines_dir)
    elif getattr(args, "state_dir", None):
        os.environ["LFR_ENGINES_DIR"] = str(Path(args.state_dir) / "engines")


def cmd_add(args) -> None:
    from lfr.models import onnx_engine

    _engines_dir(args)
    try:
        m = onnx_engine.add(args.manifest)
    except onnx_engine.ManifestError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"installed {m.model_id} {m.version} ({m.dim}-d {m.metric}, {m.size}px {m.alignment} chips) in "
          f"{m.source}; not checked yet: `lfr model check {m.model_id}` before a deployment can use it")


def cmd_list(args) -> None:
    from lfr.models import onnx_engine, scoring

    _engines_dir(args)
    rows = []
    for mid in sorted(scoring.BUILT_IN):
        r = scoring.recipe(mid)
        rows.append({"id": mid, "version": r.version, "kind": "built-in", "threshold": r.threshold,
                     "checked": "project benchmarks"})
    for m in onnx_engine.installed():
        rec = onnx_engine.check_record(m.model_id)
        rows.append({"id": m.model_id, "version": m.version, "kind": f"onnx {m.dim}-d {m.metric}",
                     # the default in use: the check's when its data resolved the target (as the registry does)
                     "threshold": rec["threshold"]["value"] if rec and rec["threshold"].get("resolved")
                     else m.threshold,
                     "checked": (f"{rec['completed_at']}" + (f" (--limit {rec['limit']})" if rec.get("limit") else ""))
                     if rec else "NOT CHECKED: cannot be authorised"})
    if args.json:
        print(json.dumps({"engines_dir": str(onnx_engine.engines_dir()), "models": rows}))
        return
    print(f"engines folder: {onnx_engine.engines_dir()}")
    for r in rows:
        print(f"{r['id']:<24} {r['version']:<46} {r['kind']:<20} threshold {r['threshold']:<8.4g} {r['checked']}")


def policy_far(args) -> tuple[float, str]:
    """The false-accept target of the check and where it came from: ``--far`` (an explicit override), else the
    policy's ``engines.false_accept_target`` (absent: the rule's 1e-5), read from the running system's GetPolicy
    when the state folder names one that answers, else from the policy file (LFR_POLICY_FILE or the shipped
    example)."""
    from lfr.cli.client import AccessError, cli_access, state_dir_of
    from lfr.policy import PolicyError, parse_policy

    if args.far is not None:
        return args.far, "--far (explicit override of the policy's target)"
    state = state_dir_of(args)
    endpoints = state / "endpoints.json"
    if endpoints.is_file():
        import grpc

        from lfr.pb import watchlist_pb2, watchlist_pb2_grpc

        try:
            channel = cli_access(args).channel(json.loads(endpoints.read_text())["watchlist"])
            p = watchlist_pb2_grpc.WatchlistServiceStub(channel).GetPolicy(watchlist_pb2.GetPolicyRequest(), timeout=10)
            channel.close()
        except AccessError as exc:
            print(f"refused: reading the running system's policy: {exc}", file=sys.stderr)
            sys.exit(2)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                print(f"refused: GetPolicy: {exc.code().name}: {exc.details()}", file=sys.stderr)
                sys.exit(2)
        else:
            far = parse_policy(p.json).false_accept_target
            return far, f"policy {p.version} (digest {p.digest[:12]}) of the running system ({state})"
    path = os.environ.get("LFR_POLICY_FILE", "")
    try:
        if path:
            text, where = Path(path).read_text(), f"policy file {path} (LFR_POLICY_FILE; no running system)"
        else:
            from importlib.resources import files

            text = (files("lfr.watchlist") / "default_policy.json").read_text()
            where = "the shipped example policy (no running system, LFR_POLICY_FILE unset)"
        pol = parse_policy(text)
    except (OSError, PolicyError) as exc:
        print(f"refused: LFR_POLICY_FILE: {exc}", file=sys.stderr)
        sys.exit(2)
    return pol.false_accept_target, f"policy {pol.version}: {where}"


def cmd_check(args) -> None:
    from lfr.bench import engine_check
    from lfr.models import onnx_engine

    _engines_dir(args)
    far, far_source = policy_far(args)
    try:
        r = engine_check.run(args.id, args.beside, args.data, args.limit, far, args.threads, args.device,
                             quiet=args.quiet, far_source=far_source)
    except onnx_engine.ManifestError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(r) if args.json else engine_check.format_text(r))


def add_parsers(sub) -> None:
    p = sub.add_parser("model", help="engines plugged in by manifest: add, list, check (docs/engines.md)")
    msub = p.add_subparsers(dest="model_command", required=True)

    def common(q):
        q.add_argument("--engines-dir", type=Path, default=None,
                       help="engines folder (default $LFR_ENGINES_DIR, else <$LFR_STATE_DIR or ./state>/engines)")
        q.add_argument("--state-dir", type=Path, default=None, help="the system's state folder: its engines/")

    a = msub.add_parser("add", help="verify an engine's manifest and file (sha256, opset, sizes) and install it")
    a.add_argument("manifest", type=Path)
    common(a)
    a.set_defaults(func=cmd_add)

    ls = msub.add_parser("list", help="built-in models and installed engines, with their check")
    ls.add_argument("--json", action="store_true")
    common(ls)
    ls.set_defaults(func=cmd_list)

    c = msub.add_parser("check", help="verification + identification benchmarks, speed and the default threshold "
                        "of an installed engine beside the live model; records the completed check")
    c.add_argument("id")
    c.add_argument("--data", type=Path, default=None,
                   help="evaluation folder in the LFW layout (default: the development data)")
    c.add_argument("--limit", type=int, default=None, help="at most N pairs per pair file and N identities")
    c.add_argument("--beside", default=None, help="model to compare with (default: $LFR_MODEL, the live model)")
    c.add_argument("--far", type=float, default=None,
                   help="override the false-accept target of the default threshold (default: the policy's "
                   "engines.false_accept_target, from the running system's GetPolicy, else the policy file)")
    c.add_argument("--as", dest="actor", default=None,
                   help="who is acting (a development user of an embedded system, to read its policy)")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--device", default=None)
    c.add_argument("--quiet", action="store_true", help="no progress on stderr")
    c.add_argument("--json", action="store_true")
    common(c)
    c.set_defaults(func=cmd_check)
