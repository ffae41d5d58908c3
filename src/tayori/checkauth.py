"""``tayori check-auth``: SPF, DKIM, DMARC and ARC for one message, offline, with reasons.

Takes: a message file (header, empty line, body; CRLF or LF line ends; a leading mbox
``From `` line is skipped), the client's IP address, its HELO name and the MAIL FROM
address (``--mail-from``, default the null reverse-path), the config (``-c FILE``, the
embedded default without it) for ``dns.nameservers`` (empty: the system's resolver),
``hostname``, ``authserv_id`` and the ``[spf]`` / ``[dmarc]`` policies, and optionally
``--now`` (Unix seconds or ISO 8601) to check as at a frozen time.
Promises: runs the server's own stage (:class:`tayori.auth.inbound.Inbound`, the client
screened) with all four checks on, whatever the config's switches say, and without
recording DMARC report data; prints one line per method result with its reason (one
per DKIM signature), what tayori would answer at MAIL FROM and at the end of the data,
and the header fields it would prepend. Exit status 0 when the checks ran, whatever
their results; 1 for a problem the user can fix (an unreadable message file, a bad
address or time, a bad config), said in one line on stderr.
Failure policy: DNS trouble shows as temperror results, as in the server; never a
traceback for a user error.
Config keys: ``dns.*``, ``hostname``, ``authserv_id``, ``spf.*``, ``dkim.max_signatures``,
``dmarc.*``.
Standards: those of :mod:`tayori.auth.inbound`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import ipaddress
import re
import sys
import time
from collections.abc import Callable

from tayori.auth.dkim import DkimSignatureResult
from tayori.auth.inbound import Inbound, InboundVerdict, SpfOutcome
from tayori.config import Config, load
from tayori.errors import Reply
from tayori.policy.screening import Client

_LINE_END = re.compile(rb"\r?\n")


class CheckAuthError(Exception):
    """A problem with the command's input, told to the user in one line."""


@dataclasses.dataclass(frozen=True, slots=True)
class Case:
    """What to check: the message as the spool would hold it, and the session's facts."""

    message: bytes
    client_ip: str
    helo: str
    mail_from: str
    now: float


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
                ) -> None:
    parser = with_config(commands.add_parser(
        "check-auth", help="check SPF, DKIM, DMARC and ARC of a message, with the reasons"))
    parser.add_argument("message", metavar="MESSAGE", help="the message file")
    parser.add_argument("--ip", required=True, help="the client's IP address")
    parser.add_argument("--helo", required=True, metavar="NAME", help="its EHLO/HELO name")
    parser.add_argument("--mail-from", default="", metavar="ADDR",
                        help="the MAIL FROM address (default: <>, the null sender)")
    parser.add_argument("--now", metavar="TIME",
                        help="check as at TIME: Unix seconds or ISO 8601 (default: now)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        case = Case(_message(args.message), _address(args.ip), args.helo,
                    args.mail_from.strip("<>"), _time(args.now))
    except CheckAuthError as exc:
        print(f"tayori: {exc}", file=sys.stderr)
        return 1
    outcome, verdict = asyncio.run(check(load(args.config), case))
    print("\n".join(report(outcome, verdict)))
    return 0


async def check(config: Config, case: Case) -> tuple[SpfOutcome, InboundVerdict]:
    """The stage's outcome at MAIL FROM and its verdict at the end of the data."""
    inbound = Inbound(_all_checks(config), clock=lambda: case.now)
    client = Client("check-auth", case.client_ip, screened=True)
    outcome = await inbound.at_mail(client, case.helo, case.mail_from)
    return outcome, await inbound.at_end(client, outcome, case.message)


def _all_checks(config: Config) -> Config:
    replace = dataclasses.replace
    return replace(config, spf=replace(config.spf, check=True),
                   dkim=replace(config.dkim, verify=True),
                   dmarc=replace(config.dmarc, check=True, reports=False),
                   arc=replace(config.arc, verify=True))


# --- the report ----------------------------------------------------------------------------


def report(outcome: SpfOutcome, verdict: InboundVerdict) -> list[str]:
    """The lines ``tayori check-auth`` prints."""
    lines = [_spf_line(outcome)]
    lines += [_dkim_line(signature) for signature in verdict.dkim] or ["DKIM    none: no signature"]
    end = _answer(verdict.reply) if verdict.reply else verdict.action.value
    lines += [_dmarc_line(verdict), _arc_line(verdict),
              f"At MAIL FROM: {_answer(outcome.refusal)}", f"At the end of the data: {end}"]
    if verdict.header:
        lines += ["Header fields tayori would add:",
                  verdict.header.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", "\n")]
    return lines


def _answer(reply: Reply | None) -> str:
    return "accept" if reply is None else f"refuse, {reply.code} {reply.status} {reply.text}"


def _spf_line(outcome: SpfOutcome) -> str:
    found = outcome.verdict
    if found is None:
        return "SPF     not checked: internal error"
    reason = found.explanation or found.problem or (
        f"matched {found.mechanism}" if found.mechanism else "no SPF record")
    return (f"SPF     {found.result.value} for {found.identity} {found.sender} from "
            f"{found.client_ip}: {reason}")


def _dkim_line(signature: DkimSignatureResult) -> str:
    key = f", {signature.key_bits}-bit key" if signature.key_bits else ""
    return (f"DKIM    {signature.result.value} d={signature.domain or '?'} "
            f"s={signature.selector or '?'} a={signature.algorithm or '?'}{key}: "
            f"{signature.reason}")


def _dmarc_line(verdict: InboundVerdict) -> str:
    found = verdict.dmarc
    if found is None:
        return "DMARC   not checked"
    where = f" (policy {found.policy.value} of {found.policy_domain}, disposition " \
        f"{found.disposition.value})" if found.policy is not None else ""
    author = ",".join(found.from_domains) or "no author domain"
    return f"DMARC   {found.result.value} for From {author}{where}: {found.reason}"


def _arc_line(verdict: InboundVerdict) -> str:
    chain = verdict.arc
    if chain is None:
        return "ARC     not checked"
    reason = chain.reason or ("no ARC header fields" if chain.instance == 0 else
                              f"{chain.instance} set(s), oldest pass {chain.oldest_pass}")
    return f"ARC     {chain.cv.value}: {reason}"


# --- reading the input ---------------------------------------------------------------------


def _message(path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise CheckAuthError(f"cannot read {path}: {exc.strerror}") from None
    if data.startswith(b"From "):   # an mbox separator line
        data = data.partition(b"\n")[2]
    return _LINE_END.sub(b"\r\n", data)


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise CheckAuthError(f"--ip {text!r} is not an IP address") from None


def _time(text: str | None) -> float:
    if text is None:
        return time.time()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise CheckAuthError(f"--now {text!r} is neither Unix seconds nor ISO 8601") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()
