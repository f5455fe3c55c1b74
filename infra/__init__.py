"""How clipcap-pipeline runs: local dev services (``infra.local``), cluster launcher and KubeRay manifests."""
