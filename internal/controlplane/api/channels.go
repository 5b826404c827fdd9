package api

import (
	"errors"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/ids"
	"github.com/wrenn/wrenn/internal/controlplane/notify"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

type channelJSON struct {
	ID              string     `json:"id"`
	TeamID          string     `json:"team_id"`
	Name            string     `json:"name"`
	Provider        string     `json:"provider"`
	Events          []string   `json:"events"`
	LastError       string     `json:"last_error"`
	LastDeliveredAt *time.Time `json:"last_delivered_at"`
	CreatedAt       time.Time  `json:"created_at"`
	UpdatedAt       time.Time  `json:"updated_at"`
	// Secret is the webhook signing secret, shown only when it is set.
	Secret string `json:"secret,omitempty"`
}

func channelOut(ch store.Channel) channelJSON {
	return channelJSON{ID: ch.ID, TeamID: ch.TeamID, Name: ch.Name, Provider: ch.Provider, Events: ch.Events,
		LastError: ch.LastError, LastDeliveredAt: ch.LastDeliveredAt, CreatedAt: ch.CreatedAt, UpdatedAt: ch.UpdatedAt}
}

// validChannel checks a channel's name and event list.
func validChannel(name string, events []string) error {
	if n := len(strings.TrimSpace(name)); n == 0 || n > 128 {
		return badRequest("name must be 1 to 128 characters")
	}
	if len(events) == 0 {
		return badRequest("events must list at least one of %s", strings.Join(notify.EventNames, ", "))
	}
	for _, e := range events {
		if !slices.Contains(notify.EventNames, e) {
			return badRequest("unknown event %q; known: %s", e, strings.Join(notify.EventNames, ", "))
		}
	}
	return nil
}

// channelConfig validates a provider config and gives webhooks a secret.
func channelConfig(provider string, cfg map[string]string) (map[string]string, error) {
	if cfg == nil {
		cfg = map[string]string{}
	}
	if provider == "webhook" && cfg["secret"] == "" {
		cfg["secret"] = "whsec_" + auth.RandomString(32)
	}
	if err := notify.ValidateConfig(provider, cfg); err != nil {
		return nil, badRequest("%s", err.Error())
	}
	return cfg, nil
}

func writeRole(p *principal) error {
	if p.Role != "owner" && p.Role != "admin" {
		return forbidden("changing channels needs the owner or admin role in the team")
	}
	return nil
}

func (s *Server) createChannel(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Name     string            `json:"name"`
		Provider string            `json:"provider"`
		Config   map[string]string `json:"config"`
		Events   []string          `json:"events"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if err := writeRole(p); err != nil {
		return err
	}
	if err := validChannel(req.Name, req.Events); err != nil {
		return err
	}
	cfg, err := channelConfig(req.Provider, req.Config)
	if err != nil {
		return err
	}
	ch, err := s.st.CreateChannel(r.Context(), store.Channel{ID: ids.New("ch"), TeamID: p.TeamID, Name: strings.TrimSpace(req.Name),
		Provider: req.Provider, Config: cfg, Events: req.Events})
	if errors.Is(err, store.ErrConflict) {
		return conflict("a channel named %q exists", req.Name)
	}
	s.audit(r.Context(), p, p.TeamID, "channel", ch.ID, "channel.create", err, map[string]any{"provider": req.Provider})
	if err != nil {
		return err
	}
	out := channelOut(ch)
	out.Secret = cfg["secret"]
	writeJSON(w, http.StatusCreated, out)
	return nil
}

func (s *Server) listChannels(w http.ResponseWriter, r *http.Request, p *principal) error {
	chans, err := s.st.Channels(r.Context(), p.TeamID)
	if err != nil {
		return err
	}
	out := make([]channelJSON, 0, len(chans))
	for _, ch := range chans {
		out = append(out, channelOut(ch))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// channel loads the path's channel; another team's is a missing one.
func (s *Server) channel(r *http.Request, p *principal) (store.Channel, error) {
	id := r.PathValue("id")
	if !ids.Valid("ch", id) {
		return store.Channel{}, notFound("channel")
	}
	ch, err := s.st.Channel(r.Context(), p.TeamID, id)
	if errors.Is(err, store.ErrNotFound) {
		return ch, notFound("channel")
	}
	return ch, err
}

func (s *Server) getChannel(w http.ResponseWriter, r *http.Request, p *principal) error {
	ch, err := s.channel(r, p)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, channelOut(ch))
	return nil
}

func (s *Server) updateChannel(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Name   string   `json:"name"`
		Events []string `json:"events"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if _, err := s.channel(r, p); err != nil {
		return err
	}
	if err := writeRole(p); err != nil {
		return err
	}
	if err := validChannel(req.Name, req.Events); err != nil {
		return err
	}
	ch, err := s.st.UpdateChannel(r.Context(), p.TeamID, r.PathValue("id"), strings.TrimSpace(req.Name), req.Events)
	if errors.Is(err, store.ErrConflict) {
		return conflict("a channel named %q exists", req.Name)
	}
	s.audit(r.Context(), p, p.TeamID, "channel", r.PathValue("id"), "channel.update", err, nil)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, channelOut(ch))
	return nil
}

func (s *Server) rotateChannelConfig(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Config map[string]string `json:"config"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	old, err := s.channel(r, p)
	if err != nil {
		return err
	}
	if err := writeRole(p); err != nil {
		return err
	}
	cfg, err := channelConfig(old.Provider, req.Config)
	if err != nil {
		return err
	}
	ch, err := s.st.SetChannelConfig(r.Context(), p.TeamID, old.ID, cfg)
	s.audit(r.Context(), p, p.TeamID, "channel", old.ID, "channel.rotate_config", err, nil)
	if err != nil {
		return err
	}
	out := channelOut(ch)
	out.Secret = cfg["secret"]
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) deleteChannel(w http.ResponseWriter, r *http.Request, p *principal) error {
	ch, err := s.channel(r, p)
	if err != nil {
		return err
	}
	if err := writeRole(p); err != nil {
		return err
	}
	err = s.st.DeleteChannel(r.Context(), p.TeamID, ch.ID)
	s.audit(r.Context(), p, p.TeamID, "channel", ch.ID, "channel.delete", err, nil)
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// testChannel sends one test message with the given settings, saving nothing.
func (s *Server) testChannel(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Provider string            `json:"provider"`
		Config   map[string]string `json:"config"`
	}
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if err := writeRole(p); err != nil {
		return err
	}
	if err := notify.ValidateConfig(req.Provider, req.Config); err != nil {
		return badRequest("%s", err.Error())
	}
	if err := notify.Send(r.Context(), s.notifyClient, req.Provider, req.Config, notify.Message{TeamID: p.TeamID, Timestamp: time.Now().Unix()}); err != nil {
		return errf(http.StatusBadRequest, "delivery_failed", "test notification failed: %v", err)
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	return nil
}
