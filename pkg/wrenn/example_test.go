package wrenn_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"strings"

	"github.com/wrenn/wrenn/pkg/wrenn"
)

// Run a command in a fresh capsule and destroy it.
func Example() {
	ctx := context.Background()
	c, err := wrenn.New(os.Getenv("WRENN_URL"), wrenn.WithAPIKey(os.Getenv("WRENN_API_KEY")))
	if err != nil {
		log.Fatal(err)
	}
	sb, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{Template: "minimal", Wait: true})
	if err != nil {
		log.Fatal(err)
	}
	defer c.DestroyCapsule(ctx, sb.ID)
	res, err := c.Exec(ctx, sb.ID, wrenn.ExecParams{Cmd: "uname", Args: []string{"-r"}})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("kernel %s, exit %d\n", strings.TrimSpace(string(res.Stdout)), res.ExitCode)
}

// Stream a long command's output as it comes.
func ExampleClient_ExecStream() {
	ctx := context.Background()
	c, _ := wrenn.New("http://localhost:8000", wrenn.WithAPIKey(os.Getenv("WRENN_API_KEY")))
	code, err := c.ExecStream(ctx, "sb-...", wrenn.ExecParams{Cmd: "/bin/sh", Args: []string{"-c", "make test"}},
		func(stream string, data []byte) {
			if stream == "stderr" {
				os.Stderr.Write(data)
				return
			}
			os.Stdout.Write(data)
		})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("exit", code)
}

// Upload a local file and read it back, streamed both ways.
func ExampleClient_WriteFile() {
	ctx := context.Background()
	c, _ := wrenn.New("http://localhost:8000", wrenn.WithAPIKey(os.Getenv("WRENN_API_KEY")))
	f, err := os.Open("dataset.csv")
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	if err := c.WriteFile(ctx, "sb-...", "/home/user/dataset.csv", f); err != nil {
		log.Fatal(err)
	}
	body, err := c.ReadFile(ctx, "sb-...", "/home/user/dataset.csv")
	if wrenn.IsNotFound(err) {
		log.Fatal("no such file")
	}
	defer body.Close()
}

// Drive an interactive terminal.
func ExampleClient_OpenTerminal() {
	ctx := context.Background()
	c, _ := wrenn.New("http://localhost:8000", wrenn.WithAPIKey(os.Getenv("WRENN_API_KEY")))
	t, err := c.OpenTerminal(ctx, "sb-...", wrenn.TerminalParams{Cols: 120, Rows: 40})
	if err != nil {
		log.Fatal(err)
	}
	defer t.Close()
	t.Write([]byte("ls -la; exit\n"))
	for {
		ev, err := t.Next()
		if err != nil {
			log.Fatal(err)
		}
		switch ev.Type {
		case "output":
			os.Stdout.Write(ev.Output)
		case "exit":
			fmt.Println("exit", ev.ExitCode)
			return
		}
	}
}
