"""JSON schemas for the Istio resources tandem ships (deploy/k8s), written from the Istio API
reference (istio.io/latest/docs/reference/config/). Only the fields tandem uses are allowed,
with their types and enums, and nothing else (additionalProperties false), so a typo or a
field in the wrong place fails: the Kubernetes validator has no schema for these CRDs."""

from __future__ import annotations

from typing import Any

_STR: dict[str, Any] = {"type": "string"}
_LABELS: dict[str, Any] = {"type": "object", "additionalProperties": _STR}
_DURATION: dict[str, Any] = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"}


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_METADATA = _obj({"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS}, ("name",))
_SELECTOR = _obj({"matchLabels": _LABELS})
_MTLS = _obj({"mode": {"enum": ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]}})
_PORT = _obj({"number": {"type": "integer", "minimum": 1, "maximum": 65535}})
_DESTINATION = _obj({"host": _STR, "subset": _STR, "port": _PORT}, ("host",))
_STRING_MATCH = {
    "type": "object",
    "properties": {"exact": _STR, "prefix": _STR, "regex": _STR},
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
}
_RETRY_ON = {"type": "string", "pattern": r"^[a-z0-9-]+(,[a-z0-9-]+)*$"}
_TRAFFIC_POLICY = _obj(
    {
        "tls": _obj({"mode": {"enum": ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]}}),
        "loadBalancer": _obj(
            {
                "simple": {
                    "enum": [
                        "UNSPECIFIED",
                        "RANDOM",
                        "PASSTHROUGH",
                        "ROUND_ROBIN",
                        "LEAST_REQUEST",
                        "LEAST_CONN",
                    ]
                }
            }
        ),
        "connectionPool": _obj(
            {
                "http": _obj(
                    {
                        "http2MaxRequests": {"type": "integer", "minimum": 0},
                        "maxRequestsPerConnection": {"type": "integer", "minimum": 0},
                        "http1MaxPendingRequests": {"type": "integer", "minimum": 0},
                    }
                )
            }
        ),
        "outlierDetection": _obj(
            {
                "consecutive5xxErrors": {"type": "integer", "minimum": 0},
                "consecutiveGatewayErrors": {"type": "integer", "minimum": 0},
                "interval": _DURATION,
                "baseEjectionTime": _DURATION,
                "maxEjectionPercent": {"type": "integer", "minimum": 0, "maximum": 100},
            }
        ),
    }
)


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA, "spec": spec},
        ("apiVersion", "kind", "metadata", "spec"),
    )


SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("security.istio.io/v1", "PeerAuthentication"): _resource(
        "security.istio.io/v1",
        "PeerAuthentication",
        _obj(
            {
                "selector": _SELECTOR,
                "mtls": _MTLS,
                "portLevelMtls": {
                    "type": "object",
                    "propertyNames": {"pattern": "^[0-9]+$"},
                    "additionalProperties": _MTLS,
                },
            }
        ),
    ),
    ("security.istio.io/v1", "AuthorizationPolicy"): _resource(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        _obj(
            {
                "selector": _SELECTOR,
                "action": {"enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
                "rules": {
                    "type": "array",
                    "items": _obj(
                        {
                            "from": {
                                "type": "array",
                                "items": _obj(
                                    {
                                        "source": _obj(
                                            {
                                                "principals": {"type": "array", "items": _STR},
                                                "namespaces": {"type": "array", "items": _STR},
                                            }
                                        )
                                    }
                                ),
                            },
                            "to": {
                                "type": "array",
                                "items": _obj(
                                    {
                                        "operation": _obj(
                                            {
                                                "ports": {"type": "array", "items": _STR},
                                                "paths": {"type": "array", "items": _STR},
                                            }
                                        )
                                    }
                                ),
                            },
                        }
                    ),
                },
            }
        ),
    ),
    ("networking.istio.io/v1", "DestinationRule"): _resource(
        "networking.istio.io/v1",
        "DestinationRule",
        _obj({"host": _STR, "trafficPolicy": _TRAFFIC_POLICY}, ("host",)),
    ),
    ("networking.istio.io/v1", "VirtualService"): _resource(
        "networking.istio.io/v1",
        "VirtualService",
        _obj(
            {
                "hosts": {"type": "array", "items": _STR, "minItems": 1},
                "http": {
                    "type": "array",
                    "items": _obj(
                        {
                            "name": _STR,
                            "match": {"type": "array", "items": _obj({"uri": _STRING_MATCH})},
                            "route": {
                                "type": "array",
                                "minItems": 1,
                                "items": _obj(
                                    {"destination": _DESTINATION, "weight": {"type": "integer"}},
                                    ("destination",),
                                ),
                            },
                            "retries": _obj(
                                {
                                    "attempts": {"type": "integer", "minimum": 0},
                                    "perTryTimeout": _DURATION,
                                    "retryOn": _RETRY_ON,
                                },
                                ("attempts",),
                            ),
                            "timeout": _DURATION,
                        },
                        ("route",),
                    ),
                },
            },
            ("hosts",),
        ),
    ),
}
