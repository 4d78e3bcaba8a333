"""`handoff tls-certs`: a throwaway CA and host certificates for trying cross-host migration.

For trials only: `handoff.transport.pki` makes them (the CA's key is never written, keys are
0600, nothing is overwritten); this prints what was written and the flags each host's VMM takes.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from handoff.machine.config import ConfigError
from handoff.transport.pki import PkiError, make_pki

TRIAL_CA_NAME = "handoff trial"


def tls_certs_main(out: str, hosts: Sequence[tuple[str, list[str]]], days: int) -> int:
    names = [name for name, _ in hosts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--host {', '.join(twice)} given twice: one --host per host")
    try:
        pki = make_pki(
            out,
            dict(hosts),
            ca_name=TRIAL_CA_NAME,
            valid=datetime.timedelta(days=days),
            exclusive=True,
        )
    except PkiError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot write to {out}: {exc.strerror or exc}") from None
    first = next(iter(pki.values()))
    print(f"a throwaway CA for trials, valid {days} days: {first.ca} (its key was not kept)")
    for (name, addresses), files in zip(hosts, pki.values(), strict=True):
        print(
            f"  {name} ({', '.join(addresses)}): --tls-cert {files.cert} "
            f"--tls-key {files.key} --tls-ca {files.ca}"
        )
    print(
        "copy each host's .key (mode 0600) to that host only, the CA certificate to every "
        "host; for trials only, not for guests that matter"
    )
    return 0
