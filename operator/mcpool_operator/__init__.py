"""mcpool's control plane: the kopf operator that turns MCPPool resources into MCP pools."""
