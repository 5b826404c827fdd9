import { defineConfig } from 'vite'
import { svelte } from '@sveltejs/vite-plugin-svelte'

// The build lands in the Go tree, where wrenn-cp embeds it (go:embed);
// `npm run dev` (make dev-frontend) proxies the API to a running wrenn-cp.
const api = process.env.WRENN_URL || 'http://127.0.0.1:8000'

export default defineConfig({
  plugins: [svelte()],
  build: { outDir: '../internal/controlplane/web/dist', emptyOutDir: true, chunkSizeWarningLimit: 1200 },
  server: {
    port: 5173,
    proxy: { '/v1': { target: api, ws: true }, '/openapi.yaml': api, '/healthz': api },
  },
  test: { environment: 'jsdom', include: ['src/**/*.test.js'] },
  // Component tests mount the browser build of Svelte.
  resolve: process.env.VITEST ? { conditions: ['browser'] } : undefined,
})
