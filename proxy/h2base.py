"""What the HTTP/2 upstream side needs from the h2 library, and no more.

(The downstream side does not use h2: see ``h2wire``.)

``GracefulH2`` is h2's ``H2Connection`` with one change: a GOAWAY (received,
or sent through ``goaway_bytes``) does not stop the streams it lets finish.
h2 4.x moves its whole connection to CLOSED on any GOAWAY, after which a
DATA frame of a stream below ``last_stream_id`` is a protocol error; RFC 9113
section 6.8 says those streams complete normally. The pinned h2 (4.4.1)
dispatches frames through ``_receive_goaway_frame``, which is overridden
here to keep the open state.
"""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from hyperframe.frame import GoAwayFrame


class GracefulH2(H2Connection):
    def _receive_goaway_frame(self, frame: Any) -> Any:
        sm = self.state_machine
        before = sm.state
        result = super()._receive_goaway_frame(frame)
        if before in (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN):
            sm.state = before  # streams up to last_stream_id go on; the caller opens no new ones
        return result


def config(client: bool) -> H2Configuration:
    """No inbound header validation or normalisation: ``stream_h2`` checks requests itself (cheaper, and a
    malformed request is a stream error there), and an upstream's response headers are re-checked on the
    way out by the downstream codec. Outbound headers are built lowercase and clean by Pillion."""
    return H2Configuration(client_side=client, header_encoding=None, validate_inbound_headers=False,
                           normalize_inbound_headers=False, validate_outbound_headers=False,
                           normalize_outbound_headers=False, split_outbound_cookies=False)


def goaway_bytes(last_stream_id: int, error_code: int) -> bytes:
    """A GOAWAY frame written without telling h2 (which would refuse to send anything after it)."""
    f = GoAwayFrame(0)
    f.last_stream_id = last_stream_id
    f.error_code = error_code
    return f.serialize()
