// Starts Swagger UI on /docs. A file of its own rather than an inline script, because the server's
// Content-Security-Policy lets only scripts from this origin run.
"use strict";

(function () {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    deepLinking: true,
    // The default sends the document to validator.swagger.io for a badge: nothing may leave the host.
    validatorUrl: null,
  });
})();
