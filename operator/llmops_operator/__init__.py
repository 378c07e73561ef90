"""The llmops Kopf operator: LLMDeployment resources reconciled into KubeRay and KEDA objects."""
