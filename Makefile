# Wrenn — run `make help` for the targets.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Local settings (see .env.example); the environment still wins over defaults below.
-include .env

GO      ?= go
BUILDS  := builds
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/wrenn/wrenn/internal/version.Version=$(VERSION)

# Pinned developer tools, installed once into a cache outside the repo.
BUF_VERSION            := v1.75.0
PROTOC_GEN_GO_VERSION  := v1.36.12
CONNECT_GEN_VERSION    := v1.21.1
STATICCHECK_VERSION    := v0.8.2
TOOLS_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/wrenn-tools
TOOLS_BIN := $(TOOLS_DIR)/$(BUF_VERSION)-$(PROTOC_GEN_GO_VERSION)-$(CONNECT_GEN_VERSION)-$(STATICCHECK_VERSION)/bin

# Where images and kernels are installed, and where slow builds are cached.
WRENN_DIR   ?= /var/lib/wrenn
WRENN_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/wrenn
export WRENN_DIR WRENN_CACHE

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: build-guest ## Build every binary into builds/
	@mkdir -p $(BUILDS)
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BUILDS)/ ./cmd/wrenn-cp ./cmd/wrenn-agent ./cmd/wrenn ./cmd/wrenn-image

.PHONY: build-guest
build-guest: build-envd ## Build what goes into guest images: envd, wrenn-init (static), and wrenn-image
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BUILDS)/wrenn-init ./cmd/wrenn-init
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BUILDS)/wrenn-image ./cmd/wrenn-image

.PHONY: kernel
kernel: ## Build the guest kernel (cached) into WRENN_DIR/kernels/vmlinux-<version>
	scripts/with-progress.sh kernel scripts/build-kernel.sh

.PHONY: rootfs
rootfs: build-guest ## Build the minimal guest image with debootstrap (cached) into WRENN_DIR/images/minimal
	scripts/with-progress.sh rootfs scripts/build-rootfs.sh minimal

.PHONY: rootfs-base
rootfs-base: build-guest ## Build the base guest image (Python, Node.js, git, build tools; cached) into WRENN_DIR/images/base
	scripts/with-progress.sh rootfs-base scripts/build-rootfs.sh base

.PHONY: rootfs-code-runner
rootfs-code-runner: build-guest ## Build the code-runner-beta image (base + Jupyter on 8888, for code interpreters; cached)
	scripts/with-progress.sh rootfs-code-runner scripts/build-rootfs.sh code-runner-beta

.PHONY: images
images: kernel rootfs rootfs-base rootfs-code-runner ## Build the kernel and the minimal, base and code-runner-beta images

.PHONY: update-minimal-rootfs
update-minimal-rootfs: build-guest ## Refresh envd and wrenn-init inside WRENN_DIR/images/minimal
	scripts/update-minimal-rootfs.sh

.PHONY: build-envd
build-envd: ## Build envd as a static binary (it runs inside any guest image)
	@mkdir -p $(BUILDS)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BUILDS)/envd ./cmd/envd
	@if file $(BUILDS)/envd | grep -q 'statically linked'; then echo "builds/envd: statically linked"; \
	 else echo "builds/envd is not statically linked:"; file $(BUILDS)/envd; exit 1; fi

.PHONY: postgres
postgres: ## Start the private PostgreSQL cluster in .dev/postgres (scripts/postgres.sh)
	scripts/postgres.sh start

.PHONY: test
test: images postgres web-deps ## Build the guest images if needed (cached), start PostgreSQL, then run every test (as root)
	cd web && npx vitest run
	$(MAKE) --no-print-directory web-check
	WRENN_REQUIRE_IMAGES=1 WRENN_REQUIRE_DB=1 WRENN_REQUIRE_BROWSER=1 WRENN_TEST_DATABASE_URL="$$(scripts/postgres.sh url)" \
		WRENN_ARTIFACTS="$(CURDIR)/$(BUILDS)/artifacts" $(GO) test -race -count=1 -timeout 30m ./...
	$(MAKE) --no-print-directory fuzz

# Fuzz targets: package and function. `make fuzz FUZZTIME=10m` digs longer.
FUZZ_TARGETS := internal/controlplane/api:FuzzDecodeRequests internal/controlplane/api:FuzzHostRegistration \
	internal/controlplane/recipe:FuzzParse internal/envd/identity:FuzzResolvePath
FUZZTIME ?= 10s

.PHONY: fuzz
fuzz: ## Run every fuzz target for FUZZTIME (10s each in make test)
	@mkdir -p $(BUILDS)
	@for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; fn=$${t##*:}; echo "fuzz $$fn ($$pkg, $(FUZZTIME))"; \
		$(GO) test ./$$pkg -run '^$$' -fuzz "^$$fn$$" -fuzztime $(FUZZTIME) >$(BUILDS)/fuzz.log 2>&1 || { cat $(BUILDS)/fuzz.log; exit 1; }; \
	done

.PHONY: test-kvm
test-kvm: images postgres ## On a KVM host: Firecracker for real (driver, agent suite, journey; direct, diff snapshots, jailed). FIRECRACKER=, JAILER=
	scripts/test-kvm.sh

.PHONY: chaos
chaos: images postgres ## Fault-injection tests and a soak (WRENN_SOAK, default 5m); prints what was survived
	scripts/chaos.sh

.PHONY: web-deps
web-deps: web/node_modules/.installed e2e/e2bsdk/node_modules/.installed ## Install the npm packages: the dashboard's and the official e2b SDK the tests drive (pinned by package-lock.json)

e2e/e2bsdk/node_modules/.installed: e2e/e2bsdk/package.json e2e/e2bsdk/package-lock.json
	cd e2e/e2bsdk && npm ci --no-audit --no-fund
	@touch $@

web/node_modules/.installed: web/package.json web/package-lock.json
	@node -e 'const [a,b]=process.versions.node.split(".").map(Number); if (a<20||(a==20&&b<19)) { console.error("the dashboard needs Node.js 20.19 or newer, this is "+process.version); process.exit(1) }'
	cd web && npm ci --no-audit --no-fund
	@touch $@

.PHONY: web
web: web-deps ## Build the dashboard into internal/controlplane/web/dist (committed; go build embeds it)
	cd web && npx vite build

.PHONY: apidocs
apidocs: web-deps ## Copy Swagger UI (swagger-ui-dist, pinned in web/package.json) into internal/controlplane/apidocs/dist (committed; served at /docs)
	cp web/node_modules/swagger-ui-dist/swagger-ui-bundle.js web/node_modules/swagger-ui-dist/swagger-ui.css \
		web/node_modules/swagger-ui-dist/LICENSE web/node_modules/swagger-ui-dist/NOTICE internal/controlplane/apidocs/dist/

.PHONY: web-check
web-check: web-deps ## Fail if the committed dashboard build is not what web/ builds
	@rm -rf $(BUILDS)/web-check && cd web && npx vite build --logLevel warn --outDir ../$(BUILDS)/web-check
	@diff -r $(BUILDS)/web-check internal/controlplane/web/dist >/dev/null || { echo "internal/controlplane/web/dist is stale: run make web and commit it" >&2; exit 1; }

.PHONY: check
check: fmt-check vet lint test ## fmt + vet + lint + test

.PHONY: fmt-check
fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

.PHONY: fmt
fmt: ## Format the Go code
	gofmt -w $$(git ls-files '*.go')

.PHONY: vet
vet: ## go vet
	$(GO) vet ./...

.PHONY: lint
lint: tools ## staticcheck
	$(TOOLS_BIN)/staticcheck ./...

.PHONY: proto
proto: tools ## Regenerate the protobuf and Connect code (committed)
	PATH=$(TOOLS_BIN):$$PATH $(TOOLS_BIN)/buf generate

.PHONY: bench
bench: build-envd images postgres ## Run the benchmarks and print a table (JSON in builds/bench.json)
	@mkdir -p $(BUILDS)
	$(GO) run ./cmd/wrenn-bench -json $(BUILDS)/bench.json -database-url "$$(scripts/postgres.sh url)"

.PHONY: tools
tools: $(TOOLS_BIN)/.installed ## Install the pinned code generators and linter

$(TOOLS_BIN)/.installed:
	@mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) $(GO) install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
	GOBIN=$(TOOLS_BIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$(TOOLS_BIN) $(GO) install connectrpc.com/connect/cmd/protoc-gen-connect-go@$(CONNECT_GEN_VERSION)
	GOBIN=$(TOOLS_BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	@touch $@

.PHONY: clean
clean: ## Remove build output
	rm -rf $(BUILDS)

.PHONY: dev
dev: ## Install what is missing, build, and run PostgreSQL, wrenn-cp and an agent; Ctrl-C stops all
	scripts/dev.sh up

.PHONY: dev-agent
dev-agent: ## Run only a wrenn-agent against WRENN_CP_URL (default http://127.0.0.1:8000), registering if needed
	scripts/dev.sh agent

.PHONY: dev-down
dev-down: ## Stop what make dev left running (pauses running capsules first)
	scripts/dev.sh down

.PHONY: dev-frontend
dev-frontend: web-deps ## Dashboard with hot reload on :5173, calling the API of make dev (WRENN_URL)
	cd web && npx vite --host 127.0.0.1

.PHONY: dev-envd
dev-envd: build-envd ## Run envd alone in --dev mode on 127.0.0.1:49983 (ENVD_PORT)
	$(BUILDS)/envd --dev --port $${ENVD_PORT:-49983}
