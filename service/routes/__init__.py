"""HTTP routers, one per resource: match (POST /match, /match/batch), health (probes, metrics, info), admin."""
