"""The gateway's side of its replicas: the driver client (client.py), starting local shard
processes (launcher.py), watching and restarting them (supervisor.py), and choosing one per
request (router.py)."""
