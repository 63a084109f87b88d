// gitops-health reads llmops resources the way GitOps tools read them, with their own code:
//
//   - kstatus: sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute, what Flux, kpt and other CD tools use;
//   - Argo CD: the health Lua script run by gopher-lua, Argo CD's interpreter, set up as Argo CD sets it up for
//     a resource customization (only the base, package and table libraries and a safe os; the live object as
//     the global `obj`; the returned table read as {status, message}; a resource being deleted is
//     "Progressing: Pending deletion" without running the script).
//
// Usage:
//
//	gitops-health eval --lua health.lua  < objects   one JSON line per object: {"kstatus": ..., "argocd": ...}
//	gitops-health wait --timeout 90s     < objects   exit 0 once kstatus reads Current, 1 on Failed, 2 otherwise
//
// Objects are JSON values, one after another (`kubectl get -o json --watch` writes such a stream); a List or
// a JSON array stands for its items.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	luajson "layeh.com/gopher-json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// Health is what a client reports for one object.
type Health struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

// Reading is one object as both clients read it.
type Reading struct {
	Kind    string `json:"kind"`
	Name    string `json:"name"`
	KStatus Health `json:"kstatus"`
	ArgoCD  Health `json:"argocd,omitempty"`
}

// Argo CD's health status codes: anything else from a script reads as Unknown.
var argoCodes = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true, "Healthy": true, "Degraded": true, "Missing": true,
}

func kstatus(obj *unstructured.Unstructured) Health {
	result, err := status.Compute(obj)
	if err != nil {
		return Health{Status: "Error", Message: err.Error()}
	}
	return Health{Status: string(result.Status), Message: result.Message}
}

// toLua turns a decoded JSON value into Lua values as Argo CD hands the live object to its scripts: numbers
// (int64 from the unstructured decoder, or float64) become Lua numbers, lists become array tables.
func toLua(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case int:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case json.Number:
		return lua.LString(v)
	case []any:
		table := l.CreateTable(len(v), 0)
		for _, item := range v {
			table.Append(toLua(l, item))
		}
		return table
	case map[string]any:
		table := l.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetH(lua.LString(key), toLua(l, item))
		}
		return table
	}
	return lua.LNil
}

// openLibraries opens what Argo CD opens for a health script: package, base, table, and an os library with
// only time and date.
func openLibraries(l *lua.LState) error {
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true},
			lua.LString(lib.name)); err != nil {
			return err
		}
	}
	full := lua.NewState()
	defer full.Close()
	fullOs, ok := full.GetGlobal(lua.OsLibName).(*lua.LTable)
	if !ok {
		return errors.New("gopher-lua has no os library")
	}
	safe := l.NewTable()
	for _, name := range []string{"time", "date"} {
		if fn, ok := fullOs.RawGetString(name).(*lua.LFunction); ok && fn.IsG {
			safe.RawSetString(name, l.NewFunction(fn.GFunction))
		}
	}
	l.SetGlobal(lua.OsLibName, safe)
	return nil
}

func argoCD(obj *unstructured.Unstructured, script string) Health {
	if obj.GetDeletionTimestamp() != nil {
		return Health{Status: "Progressing", Message: "Pending deletion"}
	}
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	if err := openLibraries(l); err != nil {
		return Health{Status: "Unknown", Message: err.Error()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj.Object))
	fn, err := l.LoadString(script)
	if err == nil {
		l.Push(fn)
		err = l.PCall(0, lua.MultRet, nil)
	}
	if err != nil {
		return Health{Status: "Unknown", Message: err.Error()}
	}
	returned := l.Get(-1)
	switch returned.Type() {
	case lua.LTNil:
		return Health{}
	case lua.LTTable:
	default:
		return Health{Status: "Unknown", Message: "expect table output from Lua script, not " + returned.Type().String()}
	}
	encoded, err := luajson.Encode(returned)
	if err != nil {
		return Health{Status: "Unknown", Message: err.Error()}
	}
	var health Health
	if err := json.Unmarshal(encoded, &health); err != nil {
		var typeError *json.UnmarshalTypeError
		if errors.As(err, &typeError) && typeError.Value == "array" {
			return Health{} // an empty table encodes as []
		}
		return Health{Status: "Unknown", Message: err.Error()}
	}
	if !argoCodes[health.Status] {
		return Health{Status: "Unknown", Message: "Lua returned an invalid health status"}
	}
	return health
}

// objects calls visit for each object in the stream; a List or an array stands for its items.
func objects(in io.Reader, visit func(*unstructured.Unstructured) error) error {
	decoder := json.NewDecoder(in)
	for {
		var raw json.RawMessage
		if err := decoder.Decode(&raw); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		var items []json.RawMessage
		if len(raw) > 0 && raw[0] == '[' {
			if err := json.Unmarshal(raw, &items); err != nil {
				return err
			}
		} else {
			items = []json.RawMessage{raw}
		}
		for _, item := range items {
			obj := &unstructured.Unstructured{}
			if err := obj.UnmarshalJSON(item); err != nil {
				return err
			}
			if obj.IsList() {
				list, err := obj.ToList()
				if err != nil {
					return err
				}
				for i := range list.Items {
					if err := visit(&list.Items[i]); err != nil {
						return err
					}
				}
				continue
			}
			if err := visit(obj); err != nil {
				return err
			}
		}
	}
}

func eval(args []string) int {
	flags := flag.NewFlagSet("eval", flag.ExitOnError)
	scriptPath := flags.String("lua", "", "the Argo CD health script (leave out for kstatus only)")
	_ = flags.Parse(args)
	script := ""
	if *scriptPath != "" {
		data, err := os.ReadFile(*scriptPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		script = string(data)
	}
	out := json.NewEncoder(os.Stdout)
	err := objects(os.Stdin, func(obj *unstructured.Unstructured) error {
		reading := Reading{Kind: obj.GetKind(), Name: obj.GetName(), KStatus: kstatus(obj)}
		if script != "" {
			reading.ArgoCD = argoCD(obj, script)
		}
		return out.Encode(reading)
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "reading objects:", err)
		return 2
	}
	return 0
}

// errStop ends the reading of a stream early.
var errStop = errors.New("stop")

// wait reads successive states of one object and stops at the first that kstatus reads as Current (exit 0) or
// Failed (exit 1), as a Flux health check does; a timeout or the end of the stream exits 2.
func wait(args []string) int {
	flags := flag.NewFlagSet("wait", flag.ExitOnError)
	timeout := flags.Duration("timeout", time.Minute, "give up after this long")
	_ = flags.Parse(args)
	done := make(chan int, 1)
	go func() {
		code := 2
		err := objects(os.Stdin, func(obj *unstructured.Unstructured) error {
			health := kstatus(obj)
			fmt.Printf("%s/%s: %s: %s\n", obj.GetKind(), obj.GetName(), health.Status, health.Message)
			switch health.Status {
			case string(status.CurrentStatus):
				code = 0
			case string(status.FailedStatus):
				code = 1
			default:
				return nil
			}
			return errStop
		})
		if err != nil && err != errStop {
			fmt.Fprintln(os.Stderr, "reading objects:", err)
		}
		done <- code
	}()
	select {
	case code := <-done:
		return code
	case <-time.After(*timeout):
		fmt.Printf("timed out after %s\n", *timeout)
		return 2
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: gitops-health eval --lua <script> | wait --timeout <duration>  (objects on stdin)")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "eval":
		os.Exit(eval(os.Args[2:]))
	case "wait":
		os.Exit(wait(os.Args[2:]))
	}
	fmt.Fprintf(os.Stderr, "unknown command %q\n", os.Args[1])
	os.Exit(2)
}
