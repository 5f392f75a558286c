"""Object-store failures as one line a user can act on: what failed and what to set.

obstore's errors carry the whole HTTP exchange: with no credentials, a failed PUT to the cloud metadata
address (the last place the AWS credential chain looks); with a wrong secret, the server's whole XML body.
:func:`explain` keeps one line naming the store, the request and the fix (``[remote] credentials_file``,
the ``AWS_*`` variables, ``[remote] endpoint``/``AWS_ENDPOINT_URL``, the bucket in ``[remote] url``); the raw
text goes to the debug log. A pure function of (error text, what was asked, where).
"""

from __future__ import annotations

import re

_XML_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]{1,300})</Message>")
_STATUS = re.compile(r"\b([1-5]\d\d) [A-Z][A-Za-z ]{2,40}")
CREDENTIALS_HINT = ("set [remote] credentials_file (an AWS credentials file) or AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY in the daemon's environment")
ENDPOINT_HINT = "check [remote] endpoint (or AWS_ENDPOINT_URL; unset means AWS itself) and the network"

# S3 error codes whose remedy is known: code -> (what went wrong, what to set).
_CODES = {
    "SignatureDoesNotMatch": ("the secret access key is wrong",
                              "fix aws_secret_access_key in [remote] credentials_file or AWS_SECRET_ACCESS_KEY"),
    "InvalidAccessKeyId": ("the access key id is unknown to the store",
                           "fix aws_access_key_id in [remote] credentials_file or AWS_ACCESS_KEY_ID"),
    "InvalidToken": ("the session token is invalid", "refresh aws_session_token (or AWS_SESSION_TOKEN)"),
    "ExpiredToken": ("the session token has expired", "refresh aws_session_token (or AWS_SESSION_TOKEN)"),
    "AccessDenied": ("the credentials may not do this",
                     "grant them s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket on the prefix"),
    "NoSuchBucket": ("the bucket does not exist", "check the bucket in [remote] url (or create it)"),
    "AuthorizationHeaderMalformed": ("the region is wrong for this bucket",
                                     "set [remote] region (or AWS_REGION) to the bucket's region"),
    "PermanentRedirect": ("the bucket is in another region", "set [remote] region (or AWS_REGION)"),
    "SlowDown": ("the store is throttling requests", "nothing: autosaved retries with backoff"),
}


def explain(raw: str, what: str, where: str) -> str:
    """One line for a failed request ``what`` (``"PUT key"``) to the store ``where`` (its URL and
    endpoint), from obstore's error text ``raw``."""
    text = raw.split("\n\nDebug source:")[0]
    head = f"object store {where}: {what} failed"
    code = _XML_CODE.search(text)
    if code is not None and code.group(1) in _CODES:
        why, fix = _CODES[code.group(1)]
        return f"{head}: {why} ({code.group(1)}); {fix}"
    lower = text.lower()
    if any(s in lower for s in ("/latest/api/token", "/latest/meta-data", "169.254.169.254", "169.254.170.2",
                                "credential")):
        return f"{head}: no credentials (none configured, and no instance metadata service gave any); " \
               + CREDENTIALS_HINT
    if code is not None:
        message = _XML_MESSAGE.search(text)
        return f"{head}: {code.group(1)}" + (f": {' '.join(message.group(1).split())}" if message else "")
    if any(s in lower for s in ("error sending request", "connection refused", "dns error", "timed out",
                                "timeout", "connect error", "tcp connect")):
        return f"{head}: cannot reach the store; {ENDPOINT_HINT}"
    status = _STATUS.search(text)
    if status is not None:
        return f"{head}: the store answered {status.group(0).strip()}"
    first = " ".join(text.split())  # one line, whatever the client wrote
    return f"{head}: {first[:300]}"
