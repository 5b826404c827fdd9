// The control plane's own OpenAPI document, rendered by Swagger UI.
window.ui = SwaggerUIBundle({ url: '/openapi.yaml', dom_id: '#swagger-ui', deepLinking: true })
