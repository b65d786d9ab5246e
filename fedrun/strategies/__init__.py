"""Server strategies: aggregate client updates and update the global model."""
