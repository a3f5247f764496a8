"""A real SMTP server for the e-mail tests (aiosmtpd, Debian's python3-aiosmtpd).

usage: smtp.py PORT OUT
Each accepted message is appended to OUT as one JSON line (envelope, headers, text and
HTML parts). A recipient starting with `reject` gets 550, one starting with `later` gets
451, as real servers answer an unknown user and a greylisted one. Runs until stdin closes.
"""
import json
import sys
from email import policy
from email.parser import BytesParser

from aiosmtpd.controller import Controller

PORT, OUT = int(sys.argv[1]), sys.argv[2]


class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("reject"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if address.startswith("later"):
            return "451 4.7.1 Greylisted, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        msg = BytesParser(policy=policy.default).parsebytes(envelope.content)
        text = msg.get_body(("plain",))
        html = msg.get_body(("html",))
        rec = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "headers": {k.lower(): str(v) for k, v in msg.items()},
            "text": text.get_content() if text else None,
            "html": html.get_content() if html else None,
        }
        with open(OUT, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return "250 2.0.0 Ok: queued"


controller = Controller(Handler(), hostname="127.0.0.1", port=PORT)
controller.start()
print("ready", flush=True)
sys.stdin.read()
controller.stop()
