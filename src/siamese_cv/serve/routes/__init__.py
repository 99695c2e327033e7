"""The API's routers, one per resource: searches, gallery images, and the server itself."""
