"""A real RTSP server for tests: GStreamer's gst-rtsp-server, run as its own process with the system Python.

    /usr/bin/python3 tests/rtsp_server.py PORT [--size 640x480] [--user U --password P [--auth basic|digest]]
                                          [--protocols tcp|udp|both] [--per-client]

Serves a live H.264 test pattern at ``rtsp://127.0.0.1:PORT/cam`` (digest, or ``--auth basic``,
authentication when a user is given) until killed. It needs Debian's python3-gi and
gir1.2-gst-rtsp-server-1.0, which load in the system interpreter only, not in the project's
virtual environment.
"""

from __future__ import annotations

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("port")
    args.add_argument("--size", default="640x480")
    args.add_argument("--user")
    args.add_argument("--password")
    args.add_argument("--auth", choices=["basic", "digest"], default="digest")
    args.add_argument("--protocols", choices=["tcp", "udp", "both"], default="both")
    # one encoder for every client (cheap) or one per client: the shared media has been seen to wedge for
    # every client when several set up at the same instant (bench/README.md, camera bench)
    args.add_argument("--per-client", action="store_true", help="a media pipeline per client, not one shared")
    parsed = args.parse_args()
    Gst.init(None)
    width, height = parsed.size.split("x")
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(parsed.port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate=30/1 "
        "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 ! rtph264pay name=pay0 pt=96 )"
    )
    factory.set_shared(not parsed.per_client)
    protocols = {
        "tcp": GstRtsp.RTSPLowerTrans.TCP,
        "udp": GstRtsp.RTSPLowerTrans.UDP,
        "both": GstRtsp.RTSPLowerTrans.TCP | GstRtsp.RTSPLowerTrans.UDP,
    }[parsed.protocols]
    factory.set_protocols(protocols)
    if parsed.user:
        auth = GstRtspServer.RTSPAuth()
        method = {"basic": GstRtsp.RTSPAuthMethod.BASIC, "digest": GstRtsp.RTSPAuthMethod.DIGEST}[parsed.auth]
        auth.set_supported_methods(method)
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(parsed.user, parsed.password), token)
        auth.add_digest(parsed.user, parsed.password, token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_role("viewer")
        permissions.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
        permissions.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on port {parsed.port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
