"""The server's routes, one router per concern; ``unimedvl_core.surfaces.server.app`` mounts them."""
